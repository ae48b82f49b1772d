"""Parameter Golf: 11-layer GQA transformer + Parallel Muon + int6 rANS artifact + exact n-gram evaluation.

Record run (8xH100): torchrun --standalone --nproc_per_node=8 train_gpt.py   (one GPU: --nproc_per_node=1)
Every setting is a field of `Hyperparameters`, set by the upper-cased environment variable (SEED=42); the defaults
are the record configuration, and all are logged. CPU runs: see README.md.

Final log lines, each `val_loss:… val_bpb:…`: final_int6_zstd_roundtrip_exact (the model rebuilt from the artifact),
ngram_eval_exact (mixed with the exact n-gram cache), legal_ttt_exact and ttt_ngram_eval_exact (TTT_ENABLED=1);
then `Total submission int6+zstd: … bytes` (compressed model + this file; the limit is 16,000,000).

Every score is the code length of a distribution over the whole vocabulary that sums to 1, depends only on earlier
tokens, is taken before any update with the token, counts every target once and comes from the artifact's bytes.
Nothing is chosen on validation data: the exported weights and every setting come from the configuration.
"""

from __future__ import annotations

import base64
import bz2
import concurrent.futures
import copy
import dataclasses
import difflib
import errno
import fnmatch
import hashlib
import importlib
import io
import json
import lzma
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = (  # the names tools and tests may use, in the order of the sections below
    "UserError", "RunFailed", "Hyperparameters",
    "Runtime", "init_runtime", "single_process_runtime", "synchronize", "pack_source", "unpack_source",
    "code_identity",
    "read_shard", "shard_token_count", "write_shard", "find_shards", "DistributedTokenLoader", "ByteTables", "build_byte_luts",
    "count_bytes", "DATASET_MANIFEST", "load_tokenizer", "ValData", "load_val_data",
    "quantize_int6_rows", "dequantize_rows", "fake_quantize_int6", "sdpa_attention", "custom_attention",
    "AttentionCandidate", "with_attention", "SDPA_ON_HOPPER", "sdpa_on_hopper", "GPT", "build_model",
    "newton_schulz5", "build_optimizers",
    "EMA", "SWA", "train_step", "finish_step", "train",
    "calibrate_gptq", "encode_artifact", "decode_artifact", "pack_artifact", "unpack_artifact", "export_artifact",
    "load_artifact", "adopt_artifact_config", "over_size_limit",
    "plan_windows", "split_for_rank", "group_by_chunk", "window_table", "evaluate", "sliding_eval", "ExactNgramCache",
    "make_ngram_scorer", "NGRAM_AUDIT_TOLERANCE", "audit_normalized", "ScoreFirstTTT", "scored_pass", "roundtrip_eval", "ttt_eval",
    "log_header", "compile_model", "main", "shutdown",
)


# ---------------------------------------------------------------------------------------------------------------
# Config
# One frozen dataclass; every field is the upper-cased environment variable; defaults = the record configuration.
# `from_env` parses by field type and validates everything that needs neither the runtime nor the tokenizer.
# Switches: a feature's master switch is <PREFIX>_ENABLED and its knobs share the prefix (EMA_ENABLED, EMA_DECAY);
# a mode or option that is no feature's master switch says what it does (EVAL_ONLY, LN_SCALE, VAL_LAST_STEP).
# ---------------------------------------------------------------------------------------------------------------


class UserError(ValueError):
    """A problem the user controls (a setting, path, permission or data): main reports it in one line, exit 2."""


class RunFailed(Exception):
    """The run cannot give an honest result (divergence, non-finite weights or score, failed audit or write)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "skip_weights", "smear",
                    "bigram_scale", "vr_lambda", "attn_gate", "ve_layer_scales", "ve_shared.scale")
INT6_CLIP_CANDIDATES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite per-row clip quantiles
ARTIFACT_CODECS = ("rans", "zstd")  # told apart in the file by their first bytes (ARTIFACT_MAGIC)


@dataclass(frozen=True)
class Hyperparameters:
    # data
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # empty: a fresh UUID4 is drawn by from_env
    log_dir: str = "logs"
    seed: int = 1337
    vocab_size: int = 1024
    val_max_tokens: int = 0  # smoke tests: cap on validation targets (0 = all)
    # schedule
    iterations: int = 20000
    warmdown_iters: int = 3500
    warmup_steps: int = 20
    train_batch_tokens: int = 786_432  # global tokens per optimizer step
    train_micro_batch_tokens: int = 0  # per device per micro-step; 0 = derived
    train_seq_len: int = 2048
    max_wallclock_seconds: float = 600.0
    val_loss_every: int = 4000  # periodic validation of the raw weights (0 = none)
    val_last_step: bool = False  # also validate after the last step (a full eval pass; nothing uses its score)
    train_log_every: int = 500
    # model shape
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    rope_train_len: int = 1024
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    # optional model features
    smeargate_enabled: bool = True
    bigram_vocab_size: int = 1024  # 0 removes BigramHash
    bigram_dim: int = 128
    value_residual_enabled: bool = True
    gated_attention_enabled: bool = True
    xsa_last_n: int = 4
    ln_scale: bool = False
    control_tensor_name_patterns: tuple[str, ...] = CONTROL_PATTERNS
    # optimizer
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3  # per rank, before averaging; 0 disables
    # averaging and QAT
    ema_enabled: bool = True
    ema_decay: float = 0.997
    swa_enabled: bool = True  # SWA averages EMA snapshots: nothing without EMA_ENABLED=1
    swa_every: int = 50
    swa_lr_threshold: float = 0.2
    qat_enabled: bool = True
    qat_time_frac: float = 0.15
    export_weights: str = "ema"  # ema | swa | raw: chosen by configuration, never by a validation score
    diag_eval_candidates: bool = False  # also score the weights not exported
    # export
    artifact_path: str = "final_model.int6.ptz"
    artifact_limit_bytes: int = 16_000_000
    artifact_codec: str = "rans"  # rans | zstd
    zstd_level: int = 22
    keep_float_max_numel: int = 65_536
    int6_clip_candidates: tuple[float, ...] = INT6_CLIP_CANDIDATES
    export_quantizer: str = "gptq_lite"  # gptq_lite (per-row clip search) | gptq (full-Hessian)
    gptq_calib_seqs: int = 32  # sequences the export weights generate
    gptq_calib_len: int = 512
    gptq_calib_temperature: float = 0.8
    gptq_calib_seed: int = 1234  # rank r samples with seed + r
    gptq_damp: float = 0.01  # H += damp * mean(diag H) * I
    gptq_block_size: int = 128
    eval_only: bool = False  # score the artifact at ARTIFACT_PATH, no training
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_windows: int = 32
    ngram_enabled: bool = True
    ngram_mode: str = "exact"  # exact | hashed (the reference's rule, comparison only)
    ngram_min_order: int = 2
    ngram_max_order: int = 9
    ngram_mixer: str = "learned"  # learned | seed (the reference's entropy rule)
    ngram_mixer_prior: float = 0.75  # learned: the model's starting weight
    ngram_mixer_smooth: float = 10.0  # learned: step damping n / (n + this)
    ngram_mixer_guard: float = 0.9  # learned: prior of "the model alone"
    ngram_chunk_tokens: int = 65_536
    ngram_buckets: int = 4_194_304  # hashed mode only
    # the seed mixer only (NGRAM_MIXER=seed, and hashed mode): its count gate and entropy rule
    ngram_min_count: int = 2
    ngram_alpha_min: float = 0.05
    ngram_alpha_max: float = 0.70
    ngram_entropy_center: float = 3.0
    ngram_entropy_scale: float = 2.0
    ngram_center_shift: float = 0.25
    ngram_order_mults: tuple[float, ...] = (0.3, 0.3, 0.97, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
    ngram_alpha_clip: float = 0.95
    ngram_audit_positions: int = 256
    ngram_log_every: int = 20
    ttt_enabled: bool = False  # a second pass: score-first test-time training on a copy of the weights
    ttt_lr: float = 0.002  # chunk k of K: lr * 0.5 * (1 + cos(pi * k / (K - 1)))
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32_768  # targets per chunk; also the n-gram chunk of the TTT pass
    ttt_batch_seqs: int = 32  # EVAL_SEQ_LEN sequences per SGD step, over all ranks; at most a chunk's whole ones
    ttt_momentum: float = 0.9
    ttt_grad_clip: float = 1.0  # 0 disables
    ttt_freeze_blocks: int = 0  # the first N blocks stay fixed
    ttt_log_every: int = 10  # also the TTT pass's n-gram progress lines
    # runtime
    device: str = "auto"  # auto | cuda | cpu
    compile: str = "auto"  # auto (on for CUDA) | 1 | 0
    accept_sdpa: bool = False  # an H100 without FlashAttention-3 runs SDPA without attention_warning

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def micro_batch_tokens(self, world_size: int) -> int:
        """TRAIN_MICRO_BATCH_TOKENS, or upstream's 8 micro-steps over the world (fewer for a small batch)."""
        if self.train_micro_batch_tokens:
            return self.train_micro_batch_tokens
        for accum in range(max(DEFAULT_MICRO_STEPS // world_size, 1), 0, -1):
            micro, left = divmod(self.train_batch_tokens, world_size * accum)
            if left == 0 and micro % self.train_seq_len == 0 and micro > 0:
                return micro
        return self.train_batch_tokens // world_size

    def grad_accum_steps(self, world_size: int) -> int:
        return self.train_batch_tokens // (world_size * self.micro_batch_tokens(world_size))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Hyperparameters":
        check_unknown_settings(env)
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is not None:
                values[f.name] = parse_setting(f.name, f.type, raw)
        if not values.get("run_id"):
            values["run_id"] = str(uuid.uuid4())
        h = cls(**values)
        h.validate()
        return h

    def validate(self, world_size: int | None = None) -> None:
        for checks in (self._range_checks(), self._checks(world_size)):  # ranges first: sizes below divide by them
            problems = [msg for ok, msg in checks if not ok]
            if problems:
                raise UserError("invalid settings: " + "; ".join(problems))

    def _range_checks(self):
        for name, interval in FIELD_RANGES.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            yield all(in_interval(v, interval) for v in values), (
                f"{name.upper()}={format_setting(value)} must {'each ' if isinstance(value, tuple) else ''}be "
                f"{describe_interval(interval)}")
        yield not self.run_id or SAFE_RUN_ID.fullmatch(self.run_id) is not None, (
            f"RUN_ID={self.run_id!r} must be a plain file name (letters, digits, '.', '_', '-'; at most 100 "
            "characters, not starting with '.')")
        path = self.artifact_path  # the folder itself is checked at start-up
        yield os.path.basename(path) not in ("", ".", "..") and not path.endswith(("/", os.sep)), (
            f"ARTIFACT_PATH={path!r} must name a file (not empty, not a folder or ending in a separator)")

    def _checks(self, world_size):
        yield self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}"
        yield self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}"
        yield self.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even (RoPE pairs)"
        yield self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0, f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {self.head_dim} (0 = full)"
        yield self.mlp_hidden >= 1, f"MLP_MULT={self.mlp_mult} x MODEL_DIM={self.model_dim} must give an MLP of at least 1 unit"
        yield self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n} must be in [0, NUM_LAYERS={self.num_layers}]"
        yield self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE must be 0 (off) or >= 2"
        yield self.train_micro_batch_tokens % self.train_seq_len == 0, f"TRAIN_MICRO_BATCH_TOKENS={self.train_micro_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len} (0 = derived)"
        yield self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride} must be in [1, EVAL_SEQ_LEN={self.eval_seq_len}]"
        yield self.ngram_min_order <= self.ngram_max_order, f"NGRAM_MIN_ORDER={self.ngram_min_order} must be >= 2 and <= NGRAM_MAX_ORDER={self.ngram_max_order}"
        yield len(self.ngram_order_mults) >= self.ngram_max_order - self.ngram_min_order + 1, "NGRAM_ORDER_MULTS needs one multiplier per order in [NGRAM_MIN_ORDER, NGRAM_MAX_ORDER]"
        yield self.ngram_alpha_min <= self.ngram_alpha_max, f"NGRAM_ALPHA_MIN={self.ngram_alpha_min} must be <= NGRAM_ALPHA_MAX={self.ngram_alpha_max}"
        yield self.ngram_mode in ("exact", "hashed"), f"NGRAM_MODE={self.ngram_mode!r} must be 'exact' or 'hashed'"
        yield self.ngram_buckets & (self.ngram_buckets - 1) == 0, f"NGRAM_BUCKETS={self.ngram_buckets} must be a power of two"
        yield self.ngram_mixer in ("learned", "seed"), f"NGRAM_MIXER={self.ngram_mixer!r} must be 'learned' or 'seed'"
        yield self.ttt_chunk_tokens >= self.eval_seq_len, f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} must be >= EVAL_SEQ_LEN={self.eval_seq_len} (a chunk trains on whole sequences)"
        yield self.ttt_freeze_blocks <= self.num_layers, f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks} must be in [0, NUM_LAYERS={self.num_layers}]"
        yield self.export_weights in ("ema", "swa", "raw"), f"EXPORT_WEIGHTS={self.export_weights!r} must be ema, swa or raw"
        yield self.export_weights != "ema" or self.ema_enabled, "EXPORT_WEIGHTS=ema needs EMA_ENABLED=1"
        yield self.export_weights != "swa" or (self.swa_enabled and self.ema_enabled), "EXPORT_WEIGHTS=swa needs SWA_ENABLED=1 and EMA_ENABLED=1 (SWA averages EMA snapshots)"
        yield self.device in ("auto", "cuda", "cpu") and self.compile in ("auto", "0", "1"), "DEVICE must be auto|cuda|cpu and COMPILE auto|0|1"
        yield self.tokenizer_path.endswith(".model"), f"TOKENIZER_PATH={self.tokenizer_path} must be a SentencePiece .model file"
        yield self.artifact_codec in ARTIFACT_CODECS, f"ARTIFACT_CODEC={self.artifact_codec!r} must be one of {sorted(ARTIFACT_CODECS)}"
        yield self.export_quantizer in ("gptq_lite", "gptq"), f"EXPORT_QUANTIZER={self.export_quantizer!r} must be gptq_lite or gptq"
        if world_size is not None:
            passes = [("NGRAM_CHUNK_TOKENS", self.ngram_chunk_tokens)] * self.ngram_enabled + [
                ("TTT_CHUNK_TOKENS", self.ttt_chunk_tokens)] * self.ttt_enabled  # the score-then-update passes
            for problem in [batch_problem(self, world_size)] + [chunk_problem(self, *p, world_size) for p in passes]:
                yield problem is None, problem

    def log_lines(self) -> list[str]:
        return [f"hparam {f.name}:{format_setting(getattr(self, f.name))}"
                for f in sorted(dataclasses.fields(self), key=lambda f: f.name)]


DEFAULT_MICRO_STEPS = 8  # upstream: grad accumulation = 8 / WORLD_SIZE unless the batch is too small
FIELD_RANGES = {  # each numeric field's interval (each element of a tuple); NaN and inf never lie in one
    "seed": "[0, 4294967295]", "vocab_size": "[2, 65536]", "val_max_tokens": "[0, inf)", "iterations": "(0, inf)",
    "warmdown_iters": "[0, inf)", "warmup_steps": "[0, inf)", "train_batch_tokens": "(0, inf)",
    "train_micro_batch_tokens": "[0, inf)", "train_seq_len": "[2, inf)", "max_wallclock_seconds": "[0, inf)",
    "val_loss_every": "[0, inf)", "train_log_every": "(0, inf)",
    "num_layers": "(0, inf)", "model_dim": "(0, inf)", "num_heads": "(0, inf)", "num_kv_heads": "(0, inf)",
    "mlp_mult": "(0, inf)", "rope_base": "(0, inf)", "rope_dims": "[0, inf)", "rope_train_len": "(0, inf)",
    "logit_softcap": "(0, inf)", "qk_gain_init": "(0, inf)", "tied_embed_init_std": "[0, inf)",
    "bigram_vocab_size": "[0, inf)", "bigram_dim": "(0, inf)", "xsa_last_n": "[0, inf)",
    "matrix_lr": "[0, inf)", "scalar_lr": "[0, inf)", "tied_embed_lr": "[0, inf)", "muon_momentum": "[0, 1)",
    "muon_momentum_warmup_start": "[0, 1)", "muon_momentum_warmup_steps": "[0, inf)", "muon_backend_steps": "(0, inf)",
    "muon_wd": "[0, inf)", "adam_wd": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "adam_eps": "(0, inf)",
    "grad_clip_norm": "[0, inf)",
    "ema_decay": "(0, 1)", "swa_every": "(0, inf)", "swa_lr_threshold": "[0, 1]", "qat_time_frac": "[0, 1]",
    "artifact_limit_bytes": "(0, inf)", "zstd_level": "[1, 22]", "keep_float_max_numel": "[0, inf)",
    "int6_clip_candidates": "(0, 1]", "gptq_calib_seqs": "(0, inf)", "gptq_calib_len": "[2, inf)",
    "gptq_calib_temperature": "[0.001, inf)",  # lower: logits / T overflows float32
    "gptq_calib_seed": "[0, 4294967295]", "gptq_block_size": "(0, inf)",
    "gptq_damp": "[0.0001, inf)",  # lower: H is not positive definite in float32
    "eval_seq_len": "[2, inf)", "eval_stride": "(0, inf)", "eval_batch_windows": "(0, inf)",
    "ngram_min_order": "[2, inf)", "ngram_max_order": "[2, inf)", "ngram_min_count": "(0, inf)",
    "ngram_chunk_tokens": "(0, inf)", "ngram_buckets": "(0, inf)", "ngram_alpha_min": "[0, 1]",
    "ngram_alpha_max": "[0, 1]", "ngram_entropy_center": "(-inf, inf)", "ngram_entropy_scale": "[0, inf)",
    "ngram_center_shift": "(-inf, inf)", "ngram_order_mults": "[0, inf)", "ngram_alpha_clip": "[0, 1)",
    "ngram_audit_positions": "[0, inf)", "ngram_log_every": "[0, inf)",
    "ngram_mixer_prior": "(0, 1)", "ngram_mixer_smooth": "(0, inf)", "ngram_mixer_guard": "(0, 1)",
    "ttt_lr": "[0, inf)", "ttt_epochs": "(0, inf)", "ttt_chunk_tokens": "(0, inf)", "ttt_batch_seqs": "(0, inf)",
    "ttt_momentum": "[0, 1)", "ttt_grad_clip": "[0, inf)", "ttt_freeze_blocks": "[0, inf)", "ttt_log_every": "[0, inf)",
}
SAFE_RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def in_interval(value: float, interval: str) -> bool:
    """value lies in an interval written "[lo, hi)" (brackets include the bound); False for NaN."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo <= value if interval[0] == "[" else lo < value
    return above and (value <= hi if interval[-1] == "]" else value < hi)


def describe_interval(interval: str) -> str:
    """'> 0', '>= 2' for intervals open to infinity, else 'in [0, 1)' ('finite' for (-inf, inf))."""
    lo, hi = interval[1:-1].split(", ")
    if hi == "inf" and lo != "-inf":
        return f"{'>=' if interval[0] == '[' else '>'} {lo}"
    return "finite" if lo == "-inf" else f"in {interval}"


def batch_problem(h: Hyperparameters, world_size: int) -> str | None:
    """None when every rank gets whole sequences and the micro-steps add up to the batch, else the fix."""
    micro = h.micro_batch_tokens(world_size)
    accum = h.train_batch_tokens // (world_size * micro) if micro > 0 else 0
    if micro > 0 and micro % h.train_seq_len == 0 and accum >= 1 and world_size * accum * micro == h.train_batch_tokens:
        return None
    unit = world_size * h.train_seq_len
    lower = max(h.train_batch_tokens // unit, 1) * unit
    have = f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} on WORLD_SIZE={world_size} with TRAIN_SEQ_LEN={h.train_seq_len}"
    if h.train_micro_batch_tokens:
        per_step = world_size * h.train_micro_batch_tokens
        good = max(h.train_batch_tokens // per_step, 1) * per_step
        return (f"{have} and TRAIN_MICRO_BATCH_TOKENS={h.train_micro_batch_tokens}: the batch must be a multiple of "
                f"WORLD_SIZE x TRAIN_MICRO_BATCH_TOKENS = {per_step}; use TRAIN_BATCH_TOKENS={good} or leave "
                "TRAIN_MICRO_BATCH_TOKENS unset (derived)")
    return (f"{have}: the batch must split into whole sequences on every rank (a multiple of WORLD_SIZE x "
            f"TRAIN_SEQ_LEN = {unit}); use TRAIN_BATCH_TOKENS={lower} or {lower + unit}")


def chunk_problem(h: Hyperparameters, name: str, chunk_tokens: int, world_size: int) -> str | None:
    """None when a chunk gives every rank at least one full batch of windows, else the cost and the fix."""
    if chunk_tokens >= h.eval_stride * h.eval_batch_windows * world_size:
        return None
    windows = chunk_tokens / (h.eval_stride * world_size)
    cost = h.eval_batch_windows / windows
    return (f"{name}={chunk_tokens} gives each of WORLD_SIZE={world_size} ranks {windows:.3g} windows of "
            f"EVAL_STRIDE={h.eval_stride} targets per chunk, but every chunk runs at least one batch of "
            f"EVAL_BATCH_WINDOWS={h.eval_batch_windows} windows per rank: the pass would cost {cost:.3g}x the plain "
            f"pass; use {name} >= {h.eval_stride * h.eval_batch_windows * world_size}"
            + (f" or EVAL_BATCH_WINDOWS <= {int(windows)}" if windows >= 1 else ""))


# Settings of the reference (and our retired names) that this script does not have: a value equal to what we always
# do is accepted; anything else is an error, so no one believes they changed something they did not.
REFERENCE_ONLY_SETTINGS = {
    "NGRAM_EVAL": ("1", "renamed NGRAM_ENABLED"),
    "NGRAM_TWO_PASS": ("0", "two-pass rescoring scores tokens with statistics of later tokens; not offered"),
    "NGRAM_RESCORE_CHUNKS": (None, "two-pass rescoring is not offered"),
    "USE_BIGRAMHASH": ("1", "had no effect in the reference; BIGRAM_VOCAB_SIZE=0 removes BigramHash"),
    "TIE_EMBEDDINGS": ("1", "embeddings are always tied"),
    "VAL_BATCH_SIZE": (None, "unused by the reference's evaluation; see EVAL_BATCH_WINDOWS"),
    "VE_ENABLED": ("0", "value embeddings are not implemented"),
    "ARTIFACT": (None, "renamed ARTIFACT_PATH: one setting names the artifact training writes and EVAL_ONLY=1 reads"),
    **{old: (None, f"renamed {new}") for old, new in (
        ("USE_EMA", "EMA_ENABLED"), ("USE_LATE_QAT", "QAT_ENABLED"), ("USE_TTT", "TTT_ENABLED"),
        ("USE_SMEARGATE", "SMEARGATE_ENABLED"), ("USE_VALUE_RESIDUAL", "VALUE_RESIDUAL_ENABLED"),
        ("USE_GATED_ATTENTION", "GATED_ATTENTION_ENABLED"))},
}
CHECKED_PREFIXES = ("NGRAM_", "EMA_", "SWA_", "QAT_", "MUON_", "BIGRAM_", "XSA_", "ROPE_", "EVAL_", "TRAIN_",
                    "USE_", "ADAM_", "EXPORT_", "ARTIFACT", "INT6_", "TIED_", "VAL_", "TTT_", "VE_", "SMEARGATE_",
                    "VALUE_RESIDUAL_", "GATED_ATTENTION_")
NEAR_MISS_RATIO = 0.85  # difflib similarity of a typo


def check_unknown_settings(env: Mapping[str, str]) -> list[str]:
    """Refuse reference-only settings and near-misses of any setting; return the other unknown names with our
    prefixes (only logged)."""
    known = {f.name.upper() for f in dataclasses.fields(Hyperparameters)}
    errors, ignored = [], []
    for name, value in sorted(env.items()):
        if name in known:
            continue
        accepted, why = REFERENCE_ONLY_SETTINGS.get(name, (None, None))
        close = None
        if why is None:  # the same name in other case, or a close spelling
            upper = name.upper()
            close = upper if upper in known else next(
                iter(difflib.get_close_matches(upper, known, n=1, cutoff=NEAR_MISS_RATIO)), None)
        if why is not None and (accepted is None or value.strip() != accepted):
            errors.append(f"{name}={value}: {why}")
        elif close:
            errors.append(f"{name} is not a setting; did you mean {close}?")
        elif why is None and name.startswith(CHECKED_PREFIXES):
            ignored.append(name)
    if errors:
        raise UserError("unknown or unsupported settings in the environment: " + "; ".join(errors))
    return ignored


def parse_setting(name: str, type_name, raw: str):
    t = str(type_name)
    try:
        raw.encode("utf-8")  # a non-UTF-8 byte arrives as a lone surrogate
    except UnicodeEncodeError:
        raise UserError(f"{name.upper()}={ascii(raw)} is not valid UTF-8; rename the path or fix the value") from None
    try:
        if t == "bool":
            low = raw.strip().lower()
            if low not in ("0", "1", "true", "false"):
                raise ValueError("expected 0, 1, true or false")
            return low in ("1", "true")
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t.startswith("tuple[float"):
            return tuple(float(x) for x in raw.split(",") if x.strip())
        if t.startswith("tuple[str"):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        return raw
    except ValueError as e:
        raise UserError(f"{name.upper()}={raw!r}: cannot parse as {t} ({e})") from None


def format_setting(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Runtime and logging
# CUDA + NCCL when available, else CPU + gloo; one process needs no process group. Collectives are SUM (then
# scale) so they behave the same on gloo. Rank 0 logs one event per line to the console and logs/<run_id>.txt.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    use_compile: bool = False
    attention: AttentionChoice | None = None  # None = SDPA

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def init_runtime(h: Hyperparameters) -> Runtime:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is visible; use DEVICE=cpu or fix the driver")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    LOG.rank = rank
    use_compile = h.compile == "1" or (h.compile == "auto" and use_cuda)
    return Runtime(rank, world, local_rank, device, world > 1, use_compile)


def single_process_runtime(device: str | torch.device = "cpu") -> Runtime:
    return Runtime(0, 1, 0, torch.device(device), False)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """In-place; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_bytes(data: bytes | None, rt: Runtime) -> bytes | None:
    """Rank 0's bytes (or None) on every rank."""
    if not rt.distributed:
        return data
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=rt.device)
    dist.broadcast(size, src=0)
    n = int(size.item())
    if n < 0:
        return None
    buf = torch.zeros(n, dtype=torch.uint8, device=rt.device)
    if rt.is_main and n:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return data if rt.is_main else buf.cpu().numpy().tobytes()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if flag is true on any rank."""
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def synchronize(rt: Runtime) -> None:
    if rt.is_cuda:
        torch.cuda.synchronize(rt.device)


def autocast(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.is_cuda)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To CUDA through pinned memory, non-blocking."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class LogState:
    rank: int = 0  # this process's rank (init_runtime): only rank 0 logs
    path: str | None = None  # logs/<run_id>.txt once created; None again after a failed write
    failure: str | None = None  # why the file could not be written: the run goes on, then fails


LOG = LogState()


def errno_text(e: OSError) -> str:
    return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"


def check_writable_folder(folder: str, setting: str) -> None:
    probe = os.path.join(folder, f".probe.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise UserError(f"{setting}: cannot write in {folder} ({e.strerror}); choose a writable location") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def prepare_outputs(h: Hyperparameters) -> None:
    """Writable log and artifact folders; logs/<run_id>.txt is created new (never appended to)."""
    check_writable_folder(h.log_dir, f"LOG_DIR={h.log_dir}")
    if not h.eval_only:
        if os.path.isdir(h.artifact_path):
            raise UserError(f"ARTIFACT_PATH={h.artifact_path} is a folder; give a file path")
        check_writable_folder(os.path.dirname(os.path.abspath(h.artifact_path)), f"ARTIFACT_PATH={h.artifact_path}")
    path = os.path.join(h.log_dir, f"{h.run_id}.txt")
    try:
        with open(path, "x", encoding="utf-8"):
            pass
    except FileExistsError:
        raise UserError(f"log {path} already exists: RUN_ID={h.run_id} was used before; choose a new RUN_ID "
                        "(or move the old log away)") from None
    LOG.path = path
    print(path, flush=True)


def setup_logging(h: Hyperparameters, rt: Runtime) -> None:
    """Rank 0 prepares the outputs; every rank stops if it found a problem."""
    problem = None
    if rt.is_main:
        try:
            prepare_outputs(h)
        except UserError as e:
            problem = e
    if any_rank(problem is not None, rt.device):
        raise problem or UserError("rank 0 refused to start (its message says why)")


def log0(msg: str, console: bool = True) -> None:
    """Rank 0: console (unless console=False) and log file; a failed write lets the run go on (on the console)."""
    if LOG.rank != 0:
        return
    msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 name cannot cut the log
    if console:
        print(msg, flush=True)
    if LOG.path:
        try:
            with open(LOG.path, "a", encoding="utf-8") as f:
                print(msg, file=f)
        except OSError as e:
            path, LOG.path = LOG.path, None
            LOG.failure = (f"cannot write the log {path} ({errno_text(e)}); its lines from then on are only on the "
                           "console")
            log_event("log_write_failed", path=path, errno=errno.errorcode.get(e.errno, e.errno))


def raise_if_log_failed(rt: Runtime) -> None:
    """Every rank: exit 4 once rank 0 could not write its log."""
    if any_rank(LOG.failure is not None, rt.device):
        raise RunFailed("write_failed", LOG.failure or "rank 0 could not write the log")


# Upstream lines that grep tooling matches byte for byte ("zstd" / "int8_zlib" are names, whatever ARTIFACT_CODEC
# is); every other machine-read line is `event key:value ...` written by log_event.
TOTAL_SUBMISSION = "Total submission int6+zstd:"
STOPPING_EARLY = "stopping_early: wallclock_cap"
LEADERBOARD_ALIAS = "final_int8_zlib_roundtrip_exact"  # leaderboard parsers grep it


def log_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)


def log_event(event: str | None, console: bool = True, **fields) -> str:
    """`event key:value ...`, or the fields alone (event None); values hold no blanks but a last `detail` field."""
    line = " ".join(([] if event is None else [event]) + [f"{k}:{log_value(v)}" for k, v in fields.items()])
    log0(line, console)
    return line


def log_peak_memory(rt: Runtime, phase: str) -> None:
    """On CUDA since the previous phase; on the CPU the peak RSS."""
    if rt.is_cuda:
        log_event("peak_memory", allocated_mib=torch.cuda.max_memory_allocated(rt.device) // 2**20,
                  reserved_mib=torch.cuda.max_memory_reserved(rt.device) // 2**20, phase=phase)
        torch.cuda.reset_peak_memory_stats(rt.device)
    else:
        import resource
        log_event("peak_memory", rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, phase=phase)


# The counted code is the file that runs: this source, or its packed form (bz2 + base85 run by a 4-line wrapper).
PACKED_HEAD = "# train_gpt.py, packed: bz2 + base85 of the readable source"
PACKED_TEMPLATE = PACKED_HEAD + """ (sha256 {sha256}); to read it, print(source) instead of exec
import base64, bz2, linecache
source = bz2.decompress(base64.b85decode("{data}")).decode()
linecache.cache[__file__] = (len(source), None, source.splitlines(True), __file__)  # tracebacks quote the source
exec(compile(source, __file__, "exec"))
"""


def pack_source(source: str) -> str:
    raw = source.encode("utf-8")
    data = base64.b85encode(bz2.compress(raw, 9)).decode("ascii")
    return PACKED_TEMPLATE.format(sha256=hashlib.sha256(raw).hexdigest(), data=data)


def unpack_source(packed: str) -> str:
    """ValueError unless `packed` is the output of pack_source."""
    data = re.search(r'b85decode\("([^"]*)"\)', packed)
    if not packed.startswith(PACKED_HEAD) or data is None:
        raise ValueError("not a packed train_gpt.py (it does not start with the packed header)")
    return bz2.decompress(base64.b85decode(data.group(1))).decode("utf-8")


class CodeIdentity(NamedTuple):
    source: str  # the readable source
    code_bytes: int  # bytes of the file that runs: what the size limit counts
    code_sha256: str
    source_sha256: str
    packed: bool  # the file that runs is the packed form
    packed_bytes: int  # bytes of the packed form

    @property
    def form(self) -> str:
        return "packed" if self.packed else "readable"


def code_identity(path: str = __file__) -> CodeIdentity:
    data = Path(path).read_bytes()
    text = data.decode("utf-8")
    packed = text.startswith(PACKED_HEAD)
    source = unpack_source(text) if packed else text
    packed_bytes = len(data) if packed else len(pack_source(source).encode("utf-8"))
    digest = lambda b: hashlib.sha256(b).hexdigest()
    return CodeIdentity(source, len(data), digest(data), digest(source.encode("utf-8")), packed, packed_bytes)


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived: exit 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


def raise_interrupted(signum, frame) -> None:
    raise RunInterrupted(signum)


def write_file_atomic(path: str, data: bytes) -> None:
    """A reader never sees a partial file (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Data
# Shards: 256 little-endian int32 header words (magic 20240520, version 1, token count), then uint16 tokens. Each
# rank takes its own span of every global micro-batch of a cyclic token stream. bytes(y | x) = base_bytes[y] +
# (has_leading_space[y] and not is_boundary[x]) is the only byte count, bits_per_byte the only bpb formula.
# ---------------------------------------------------------------------------------------------------------------


SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_WORDS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_WORDS * 4
MAKE_DATA_HINT = ("make shards with `python3 data/cached_challenge_fineweb.py --variant sp1024` (FineWeb) or "
                  "`python3 data/make_dataset.py --input sample --name sample` (offline corpus)")


class ShardError(UserError):
    pass


def shard_token_count(path) -> int:
    """The token count of a shard whose header and size are valid (reads 1 KB)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size, head = os.fstat(f.fileno()).st_size, f.read(SHARD_HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot open shard ({e.strerror})") from None
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({size} bytes < {SHARD_HEADER_BYTES}); re-create the shard")
    header = np.frombuffer(head, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        kind = "truncated file" if size < expected else "size mismatch"
        raise ShardError(f"{path}: {kind}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Validated shard contents (uint16); a problem raises ShardError naming the file."""
    count = shard_token_count(path)
    tokens = np.fromfile(str(path), dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{path}: token id {int(tokens[bad])} at index {bad} >= vocab size {vocab_size}; "
                         "shards and tokenizer do not match")
    return tokens


def write_shard(path, tokens) -> None:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**16)):
        raise ShardError(f"{path}: tokens must be a 1-D array of ids in [0, 65535]")
    header = np.zeros(SHARD_HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    write_file_atomic(str(path), header.tobytes() + arr.astype("<u2").tobytes())


def find_shards(data_path: str, split: str) -> list[str]:
    """Sorted `*_{split}_*.bin` files in data_path, taken literally; none is a UserError."""
    pattern = f"*_{split}_*.bin"
    try:
        names = os.listdir(data_path)
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise UserError(f"DATA_PATH={data_path}: cannot list the folder ({e.strerror})") from None
    files = sorted(os.path.join(data_path, n) for n in names if fnmatch.fnmatchcase(n, pattern) and n[0] != ".")
    if not files:
        raise UserError(f"no {split} shards match {os.path.join(data_path, pattern)}; {MAKE_DATA_HINT}")
    return files


class TokenStream:
    """Cyclic stream over the train shards, the same on every rank; the next shard is read in the background."""

    def __init__(self, files: list[str], vocab_size: int | None = None):
        for f in files:
            shard_token_count(f)
        self.files, self.vocab_size = files, vocab_size
        self.checked: set[int] = set()  # shards whose token ids were validated
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self.file_index, self.pos = 0, 0
        self.tokens = self._read(0)
        self.upcoming = self.reader.submit(self._read, 1 % len(files))

    def _read(self, index: int) -> np.ndarray:
        check = self.vocab_size if index not in self.checked else None
        tokens = read_shard(self.files[index], check)
        self.checked.add(index)
        return tokens

    def _advance(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.files)
        self.tokens, self.pos = self.upcoming.result(), 0  # re-raises a ShardError from the reader thread
        self.upcoming = self.reader.submit(self._read, (self.file_index + 1) % len(self.files))

    def take(self, n: int) -> np.ndarray:
        parts, left, empty = [], n, 0
        while left > 0:
            if self.pos >= self.tokens.size:
                empty += 1
                if empty > len(self.files):  # a whole cycle without a token: would loop forever
                    raise ShardError(f"{self.files[0]}: the train shards hold no tokens")
                self._advance()
                continue
            empty = 0
            k = min(left, self.tokens.size - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, left = self.pos + k, left - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Rank r gets span r of world*(local+1) stream tokens per batch; prefetch() loads the next batch early."""

    def __init__(self, files: list[str], rt: Runtime, vocab_size: int | None = None):
        self.stream, self.rt, self.pending = TokenStream(files, vocab_size), rt, None

    def _load(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span, rank = local_tokens + 1, self.rt.rank
        mine = self.stream.take(span * self.rt.world_size)[rank * span:(rank + 1) * span]
        xy = host_to_device(torch.from_numpy(np.stack((mine[:-1], mine[1:])).astype(np.int64)), self.rt.device)
        return xy[0].view(-1, seq_len), xy[1].view(-1, seq_len)

    def prefetch(self, local_tokens: int, seq_len: int) -> None:
        if self.pending is None:
            self.pending = ((local_tokens, seq_len), self._load(local_tokens, seq_len))

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is None:
            return self._load(local_tokens, seq_len)
        (shape, batch), self.pending = self.pending, None
        if shape != (local_tokens, seq_len):
            raise ValueError(f"prefetched a batch of {shape}, asked for {(local_tokens, seq_len)}")
        return batch


def load_validation_tokens(files: list[str], seq_len: int, vocab_size: int | None = None,
                           max_targets: int = 0) -> torch.Tensor:
    """All val shards, cut to a multiple of seq_len targets (+1 token)."""
    tokens = np.concatenate([read_shard(f, vocab_size) for f in files])
    usable = (tokens.size - 1) // seq_len * seq_len
    if max_targets > 0:
        usable = min(usable, max(max_targets // seq_len, 1) * seq_len)
    if usable <= 0:
        raise ShardError(f"{files[0]}: the validation split has {tokens.size} tokens, fewer than one sequence of "
                         f"EVAL_SEQ_LEN={seq_len} + 1; lower EVAL_SEQ_LEN or add validation documents")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


class ByteTables(NamedTuple):
    base_bytes: torch.Tensor  # int16 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]

    def to(self, device) -> "ByteTables":
        return ByteTables(*(t.to(device) for t in self))


def build_byte_luts(sp, vocab_size: int) -> ByteTables:
    n = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=np.bool_)
    boundary = np.ones(n, dtype=np.bool_)
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def count_bytes(prev: torch.Tensor, tgt: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """UTF-8 bytes of each target given the token before it."""
    extra = tables.has_leading_space[tgt] & ~tables.is_boundary[prev]
    return tables.base_bytes[tgt].to(torch.int64) + extra.to(torch.int64)


def bits_per_byte(nll_sum_nats: float, num_bytes: float) -> float:
    return nll_sum_nats / math.log(2.0) / max(num_bytes, 1.0)


DATASET_MANIFEST = "manifest.json"  # data/make_dataset.py writes it beside the shards


def check_dataset_manifest(h: Hyperparameters, tokenizer_bytes: bytes) -> None:
    path = os.path.join(h.data_path, DATASET_MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        expected = json.loads(Path(path).read_text(encoding="utf-8"))["tokenizer_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable dataset manifest ({type(e).__name__}); rebuild the dataset") from None
    actual = hashlib.sha256(tokenizer_bytes).hexdigest()
    if actual != expected:
        raise UserError(f"TOKENIZER_PATH={h.tokenizer_path} (sha256 {actual[:12]}…) is not the tokenizer the shards in "
                        f"{h.data_path} were made with (sha256 {expected[:12]}… in {path}); use that tokenizer")


def load_tokenizer(h: Hyperparameters):
    """Checked against VOCAB_SIZE and the dataset manifest."""
    import sentencepiece as spm
    try:
        data = Path(h.tokenizer_path).read_bytes()
    except OSError as e:
        raise UserError(f"tokenizer {h.tokenizer_path}: cannot read ({e.strerror}); {MAKE_DATA_HINT}") from None
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        raise UserError(f"tokenizer {h.tokenizer_path} is not a SentencePiece model ({type(e).__name__})") from None
    if int(sp.vocab_size()) != h.vocab_size:  # with EVAL_ONLY, the artifact's VOCAB_SIZE
        fix = (f"set TOKENIZER_PATH to the tokenizer the model in {h.artifact_path} was trained with" if h.eval_only
               else "use the tokenizer the shards were made with or set VOCAB_SIZE")
        raise UserError(f"tokenizer {h.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={h.vocab_size}; {fix}")
    check_dataset_manifest(h, data)
    return sp


class ValData(NamedTuple):
    tokens: torch.Tensor  # int64 [N + 1] on CPU
    tables: ByteTables

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def load_val_data(h: Hyperparameters, sp) -> ValData:
    files = find_shards(h.data_path, "val")
    tokens = load_validation_tokens(files, h.eval_seq_len, h.vocab_size, h.val_max_tokens)
    tables = build_byte_luts(sp, h.vocab_size)
    total = int(count_bytes(tokens[:-1], tokens[1:], tables).sum())
    log_event("val_loader", pattern=os.path.join(h.data_path, '*_val_*.bin'), tokens=tokens.numel() - 1, bytes=total)
    return ValData(tokens, tables)


# ---------------------------------------------------------------------------------------------------------------
# Model
# GPT(h): ids [B,T] -> hidden [B,T,d] -> tied-embedding logits, soft-capped, fp32 -> cross-entropy. Every matrix
# lives in one of four fp32 banks whose names are a contract (export, optimizer routing). Optional pieces are built
# or None at construction; weights are cast at use. `qat_active` sends the banks and the bigram table through the
# int6 row grid while training (flipping it recompiles once).
# ---------------------------------------------------------------------------------------------------------------

# The int6 row grid, shared by late QAT (GPT.banks below) and export (quantize_state): it sits here, where a reader
# first meets it. Per row, the clip quantile of |w| with the least squared error wins; values in [-31, 31], fp16
# scales >= 1/31. Invariant: for any weights w, QAT's forward value fake_quantize_int6(w) is bit for bit what
# GPTQ-lite stores for w (dequantize_rows(*quantize_int6_rows(w))): the quantile is torch.quantile's (float32 rank,
# lerp of the top-k values) and the scale is rounded to fp16 by integer ops that no compiler can fuse away. (Export
# quantizes the EMA weights, and EXPORT_QUANTIZER=gptq picks other integers on the same grid.)
INT6_MAX = 31


def _quantile_rank(n: int, p: float) -> tuple[int, int, float]:
    """torch.quantile's rank float32(p)·(n−1) as (floor, ceil, weight)."""
    rank = np.float32(p) * np.float32(n - 1)
    lo = int(np.floor(rank))
    return lo, int(np.ceil(rank)), float(rank - np.float32(lo))


def top_values_needed(n: int, quantiles) -> int:
    """How many of a row's largest values determine its given quantiles."""
    return n - min(_quantile_rank(n, p)[0] for p in quantiles)


def _row_quantile(top: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """torch.quantile(x, p, dim=-1, keepdim=True) bit for bit, from top = x.topk(k).values."""
    lo, hi, weight = _quantile_rank(n, p)
    return torch.lerp(top[..., n - 1 - lo:n - lo], top[..., n - 1 - hi:n - hi], weight)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest fp16 value, kept in fp32, by integer ops that inductor cannot fuse away."""
    bits = x.view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def quantize_int6_rows(w: torch.Tensor, clip_candidates=INT6_CLIP_CANDIDATES):
    """(int8 values in [-31, 31], fp16 scales) per row of w."""
    w = w.detach().float()
    n = w.shape[-1]
    top = w.abs().topk(top_values_needed(n, clip_candidates), dim=-1).values
    best_q = best_s = best_err = None
    for p in clip_candidates:
        clip = _row_quantile(top, n, p)
        scale = torch.clamp(clip / INT6_MAX, min=1.0 / INT6_MAX)
        q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -INT6_MAX, INT6_MAX)
        err = (w - q * scale).square().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_q, best_s, best_err = q, scale, err
        else:
            better = err < best_err  # strict: ties keep the earlier candidate
            best_q = torch.where(better, q, best_q)
            best_s = torch.where(better, scale, best_s)
            best_err = torch.where(better, err, best_err)
    return best_q.to(torch.int8), round_to_fp16(best_s.squeeze(-1)).to(torch.float16)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def fake_quantize_int6(w: torch.Tensor, clip_candidates=INT6_CLIP_CANDIDATES) -> torch.Tensor:
    """Straight-through estimator: forward = the exported int6 grid point, gradient = identity."""
    wq = dequantize_rows(*quantize_int6_rows(w, clip_candidates)).to(w.dtype)
    return w + (wq - w).detach()


class Banks(NamedTuple):
    qo: torch.Tensor  # [2L, d, d]: W_q of layer i at i, W_o at L+i
    kv: torch.Tensor  # [2L, kv_dim, d]: W_k at i, W_v at L+i
    up: torch.Tensor  # [L, hidden, d]
    down: torch.Tensor  # [L, d, hidden]


class LayerSpec(NamedTuple):
    index: int
    xsa: bool
    norm_scale: float


def layer_specs(h: Hyperparameters) -> tuple[LayerSpec, ...]:
    n = h.num_layers
    return tuple(LayerSpec(i, i >= n - h.xsa_last_n, 1.0 / math.sqrt(i + 1) if h.ln_scale else 1.0)
                 for i in range(n))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),)).type_as(x)


def rope_base_eff(base: float, dims: int, train_len: int, seq_len: int) -> float:
    """NTK base rescale beyond the training length."""
    if seq_len <= train_len:
        return base
    return base * (seq_len / train_len) ** (dims / max(dims - 2, 1))  # max(): ROPE_DIMS=2 would divide by 0


class Rotary(nn.Module):
    """Partial RoPE on the first ROPE_DIMS dims of a head (0 = all), half-split pairs."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.dims = h.rope_dims or h.head_dim
        self.base, self.train_len = h.rope_base, h.rope_train_len
        exps = torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims
        self.register_buffer("inv_freq", self.base ** -exps, persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, dims/2]; b^(−e)^(ln b'/ln b) = b'^(−e) reuses the buffer."""
        eff = rope_base_eff(self.base, self.dims, self.train_len, seq_len)
        freqs = self.inv_freq if eff == self.base else self.inv_freq ** (math.log(eff) / math.log(self.base))
        angles = torch.outer(torch.arange(seq_len, device=freqs.device, dtype=torch.float32), freqs)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = (t.to(x.dtype)[None, :, None, :] for t in rope)
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output its component along its own position's value."""
    b, t, heads, d = y.shape
    unit = F.normalize(v, dim=-1).unsqueeze(3)  # [B,T,Hkv,1,D]; query head h reads kv head h // (H/Hkv)
    yg = y.reshape(b, t, v.size(2), heads // v.size(2), d)
    return (yg - (yg * unit).sum(-1, keepdim=True) * unit).reshape(b, t, heads, d)


def mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.5)² MLP, no biases."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


# Attention backends: fn(q [B,T,H,D], k, v [B,T,Hkv,D]) -> [B,T,H,D], causal GQA; SDPA is the last resort.

def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


def _flash_backend(module: str):
    """Loader of `flash_attn_func` (some versions also return the LSE)."""
    def load():
        flash_attn_func = importlib.import_module(module).flash_attn_func

        def attend(q, k, v):
            out = flash_attn_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out
        return attend
    return load


_ATTENTION_OPS: dict[str, Callable] = {}  # custom_attention's ops, registered once per name and process


def custom_attention(name: str, fwd: Callable, bwd: Callable) -> Callable:
    """fn(q, k, v) of a kernel pair as torch.library custom ops (one opaque op for torch.compile):
    fwd(q, k, v) -> (out, lse [B,H,T] fp32); bwd(dout, q, k, v, out, lse) -> (dq, dk, dv)."""
    if name in _ATTENTION_OPS:
        return _ATTENTION_OPS[name]

    @torch.library.custom_op(f"pgolf::{name}_fwd", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = fwd(q.contiguous(), k.contiguous(), v.contiguous())
        return out.contiguous(), lse.contiguous()

    @torch.library.custom_op(f"pgolf::{name}_bwd", mutates_args=())
    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(g.contiguous() for g in bwd(dout.contiguous(), q, k, v, out, lse))

    forward.register_fake(lambda q, k, v: (q.new_empty(q.shape),
                                           q.new_empty((q.size(0), q.size(2), q.size(1)), dtype=torch.float32)))
    backward.register_fake(lambda dout, q, k, v, out, lse: (q.new_empty(q.shape), k.new_empty(k.shape),
                                                            v.new_empty(v.shape)))
    forward.register_autograd(lambda ctx, dout, dlse: backward(dout, *ctx.saved_tensors),
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs, *output))
    _ATTENTION_OPS[name] = lambda q, k, v: forward(q, k, v)[0]
    return _ATTENTION_OPS[name]


def _fa4_backend() -> Callable:
    """FlashAttention-4's kernels (untraceable by torch.compile) as custom ops."""
    fa = importlib.import_module("flash_attn.cute.interface")

    def fwd(q, k, v):
        return fa._flash_attn_fwd(q, k, v, softmax_scale=q.size(-1) ** -0.5, causal=True, return_lse=True)

    def bwd(dout, q, k, v, out, lse):
        return fa._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=q.size(-1) ** -0.5, causal=True)
    return custom_attention("fa4", fwd, bwd)


class AttentionCandidate(NamedTuple):
    name: str
    load: Callable[[], Callable]  # returns the backend fn or raises
    cuda_only: bool = False


class AttentionChoice(NamedTuple):
    name: str
    fn: Callable
    skipped: tuple[tuple[str, str], ...]  # (name, reason) of the candidates not used


ATTENTION_CANDIDATES = (
    AttentionCandidate("fa3", _flash_backend("flash_attn_interface"), cuda_only=True),
    AttentionCandidate("fa4", _fa4_backend, cuda_only=True),
    AttentionCandidate("sdpa", lambda: sdpa_attention),
)


def _probe_attention(fn, device: torch.device, layout: tuple[int, int, int], compile_backend: str | None) -> None:
    """Forward + backward on bf16 inputs; raises unless output (0.05) and gradients (2%) agree with SDPA."""
    heads, kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 256, n, head_dim, generator=g).to(device, torch.bfloat16).requires_grad_()
           for n in (heads, kv_heads, kv_heads)]
    run = fn if compile_backend is None else torch.compile(fn, backend=compile_backend, fullgraph=True, dynamic=False)
    out = run(*qkv)
    out.float().square().sum().backward()
    ref_in = [t.detach().float().requires_grad_() for t in qkv]
    ref = sdpa_attention(*ref_in)
    ref.square().sum().backward()
    if out.shape != ref.shape or (out.float() - ref).abs().max().item() >= 0.05:
        raise ValueError(f"output differs from SDPA (shape {tuple(out.shape)} vs {tuple(ref.shape)})")
    for t, r in zip(qkv, ref_in):
        if t.grad is None or (t.grad.float() - r.grad).abs().max().item() >= 0.02 * r.grad.abs().max().item():
            raise ValueError("gradient differs from SDPA")


def one_line_error(e: BaseException, max_chars: int | None = 160, innermost: bool = True) -> str:
    """Type and first words of the message (of the innermost cause: compilers wrap errors)."""
    while innermost and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split())[:max_chars]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def select_attention(device, use_compile: bool, layout: tuple[int, int, int] = (8, 4, 64), *,
                     candidates=ATTENTION_CANDIDATES, compile_backend: str = "inductor") -> AttentionChoice:
    """The first candidate that passes _probe_attention here; none is a UserError."""
    device, skipped = torch.device(device), []
    for c in candidates:
        if c.cuda_only and device.type != "cuda":
            skipped.append((c.name, "needs CUDA"))
            continue
        try:
            fn = c.load()
            _probe_attention(fn, device, layout, compile_backend if use_compile else None)
            return AttentionChoice(c.name, fn, tuple(skipped))
        except Exception as e:  # not installed, untraceable, wrong: the next one
            skipped.append((c.name, one_line_error(e)))
    fix = "; set COMPILE=0 to run without torch.compile" if use_compile else ""
    raise UserError("no attention backend works here (" + "; ".join(f"{n}: {r}" for n, r in skipped) + ")" + fix)


def with_attention(rt: Runtime, h: Hyperparameters, **probe_options) -> Runtime:
    layout = (h.num_heads, h.num_kv_heads, h.head_dim)
    return dataclasses.replace(rt, attention=select_attention(rt.device, rt.use_compile, layout, **probe_options))


SDPA_ON_HOPPER = ("FlashAttention-3 is not in use on this H100-class GPU: SDPA costs an estimated +15-25 ms/step "
                  "(about 1,000 fewer steps in 600 s, a worse score); install it with `python3 "
                  "tools/install_flash_attn.py` (run.sh does), or set ACCEPT_SDPA=1 to run on SDPA knowingly")


def sdpa_on_hopper(rt: Runtime) -> bool:
    """A Hopper GPU (sm_90: FlashAttention-3) ended up on SDPA."""
    return (rt.is_cuda and rt.attention is not None and rt.attention.name == "sdpa"
            and tuple(torch.cuda.get_device_capability(rt.device)) == (9, 0))


def log_attention(rt: Runtime, h: Hyperparameters) -> None:
    """The backend and those skipped; `attention_warning` for an H100 on SDPA unless ACCEPT_SDPA=1."""
    choice = rt.attention
    skipped = {"detail": "; ".join(f"{n} skipped: {r}" for n, r in choice.skipped)} if choice.skipped else {}
    log_event("attention", backend=choice.name, **skipped)
    if sdpa_on_hopper(rt) and not h.accept_sdpa:
        log_event("attention_warning", backend="sdpa", device="sm_90", detail=SDPA_ON_HOPPER)


class Attention(nn.Module):
    """GQA causal attention on bank weights: QK RMSNorm, partial RoPE, q-gain; optional XSA, gate, value residual."""

    def __init__(self, h: Hyperparameters, spec: LayerSpec, attn_fn):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = h.num_heads, h.num_kv_heads, h.head_dim
        self.xsa, self.attn_fn = spec.xsa, attn_fn
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.attn_gate = nn.Linear(h.model_dim, h.num_heads) if h.gated_attention_enabled else None
        if self.attn_gate is not None:  # gate = sigmoid(0·x + 4) ≈ 0.982 at init
            nn.init.zeros_(self.attn_gate.weight)
            nn.init.constant_(self.attn_gate.bias, 4.0)
        self.vr_lambda = nn.Parameter(torch.full((2,), 0.5)) if h.value_residual_enabled else None

    def forward(self, x, w, v0, rope):
        """w = (W_q, W_k, W_v, W_o); v0 = layer 0's values or None. Returns (out, raw v)."""
        b, t, _ = x.shape
        w_q, w_k, w_v, w_o = w
        q = F.linear(x, w_q).view(b, t, self.heads, self.head_dim)
        k = F.linear(x, w_k).view(b, t, self.kv_heads, self.head_dim)
        v = raw_v = F.linear(x, w_v).view(b, t, self.kv_heads, self.head_dim)
        if self.vr_lambda is not None and v0 is not None:
            lam = self.vr_lambda.to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q = apply_rotary(rms_norm(q), rope) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rotary(rms_norm(k), rope)
        y = self.attn_fn(q, k, v)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.attn_gate is not None:
            gate = torch.sigmoid(F.linear(x, self.attn_gate.weight.to(x.dtype), self.attn_gate.bias.to(x.dtype)))
            y = y * gate.unsqueeze(-1)
        return F.linear(y.reshape(b, t, -1).to(x.dtype), w_o), raw_v


class Block(nn.Module):
    """x_in = mix(x, x0); x = x_in + s_a·Attn(norm x_in); x = x + s_m·MLP(norm x)."""

    def __init__(self, h: Hyperparameters, spec: LayerSpec, attn_fn):
        super().__init__()
        d = h.model_dim
        self.index, self.num_layers, self.norm_scale = spec.index, h.num_layers, spec.norm_scale
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.attn = Attention(h, spec, attn_fn)

    def _norm(self, x):
        n = rms_norm(x)
        return n * self.norm_scale if self.norm_scale != 1.0 else n

    def forward(self, x, x0, v0, rope, banks: Banks):
        i, n = self.index, self.num_layers
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        w = (banks.qo[i], banks.kv[i], banks.kv[n + i], banks.qo[n + i])
        a, raw_v = self.attn(self._norm(x), w, v0, rope)
        x = x + self.attn_scale.to(x.dtype) * a
        x = x + self.mlp_scale.to(x.dtype) * mlp(self._norm(x), banks.up[i], banks.down[i])
        return x, raw_v


def bigram_buckets(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """((36313·t_i) XOR (27191·t_{i−1})) mod (buckets−1) in int32; position 0 gets buckets−1."""
    t = ids.to(torch.int32)
    pair = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % (buckets - 1)
    return torch.cat((torch.full_like(t[:, :1], buckets - 1), pair), dim=1).long()


class BigramHash(nn.Module):
    """Hashed token-pair embedding: zero table -> orthogonal projection -> × scale (0.05)."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))
        nn.init.zeros_(self.embed.weight)
        nn.init.orthogonal_(self.proj.weight)  # as the reference's model-wide pass

    def forward(self, ids, dtype, qat_clips=None):
        table = self.embed.weight
        if qat_clips is not None:
            table = fake_quantize_int6(table.float(), qat_clips)
        e = F.embedding(bigram_buckets(ids, self.buckets), table).to(dtype)
        return F.linear(e, self.proj.weight.to(dtype)) * self.scale.to(dtype)


class SmearGate(nn.Module):
    """x_i ← (1−g)⊙x_i + g⊙x_{i−1}, g = sigmoid(gate) per channel, x_{−1} = 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = torch.sigmoid(self.gate.to(x.dtype))
        return x + g * (F.pad(x[:, :-1], (0, 0, 1, 0)) - x)


class GPT(nn.Module):
    """Embeddings (+BigramHash, SmearGate) -> U-Net of blocks -> tied soft-capped head."""

    def __init__(self, h: Hyperparameters, attn_fn=None):
        super().__init__()
        n, d = h.num_layers, h.model_dim
        self.softcap, self.clips = h.logit_softcap, tuple(h.int6_clip_candidates)
        self.num_encoder, self.capture_v0 = n // 2, h.value_residual_enabled
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        self.bigram = BigramHash(h.bigram_vocab_size, h.bigram_dim, d) if h.bigram_vocab_size > 0 else None
        self.smear = SmearGate(d) if h.smeargate_enabled else None
        self.qo_bank = nn.Parameter(torch.empty(2 * n, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * n, h.kv_dim, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(n, h.mlp_hidden, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(n, d, h.mlp_hidden))
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, n - self.num_encoder), d))
        self.rotary = Rotary(h)
        self.blocks = nn.ModuleList(Block(h, s, attn_fn or sdpa_attention) for s in layer_specs(h))
        self.qat_active = False
        self._init_weights(h)

    @torch.no_grad()
    def _init_weights(self, h: Hyperparameters) -> None:
        """OrthoInit: orthogonal W_q, W_k, W_v, W_up; zero W_o, W_down."""
        n = h.num_layers
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        for i in range(n):
            for w in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[n + i], self.mlp_up_bank[i]):
                nn.init.orthogonal_(w)
        self.qo_bank[n:].zero_()
        self.mlp_down_bank.zero_()

    def _qat(self) -> bool:
        return self.qat_active and self.training

    def banks(self, dtype: torch.dtype) -> Banks:
        """The one place bank weights are prepared: int6 fake-quant (QAT, training only), then cast."""
        ws = (self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank)
        if self._qat():
            ws = tuple(fake_quantize_int6(w, self.clips) for w in ws)
        return Banks(*(w.to(dtype) for w in ws))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        kind = ids.device.type  # the compute dtype: autocast's (bf16 on CUDA) or fp32; weights are cast to it
        dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32
        banks, rope = self.banks(dt), self.rotary(ids.size(1))
        x = self.tok_emb(ids).to(dt)
        if self.bigram is not None:
            x = x + self.bigram(ids, dt, self.clips if self._qat() else None)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x)
        x0, v0, skips = x, None, []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:  # decoder j = i − num_encoder pairs with encoder output 4−j, ...
                x = x + self.skip_weights[i - self.num_encoder].to(dt) * skips.pop()
            x, raw_v = block(x, x0, v0, rope, banks)
            if i < self.num_encoder:
                skips.append(x)
            if i == 0 and self.capture_v0:
                v0 = raw_v
        return rms_norm(x)

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits c·tanh(z·Eᵀ / c) with the tied embedding E."""
        z = self.hidden(ids)
        logits = F.linear(z, self.tok_emb.weight.to(z.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Without targets the logits (how evals call the compiled module); with them the cross-entropy."""
        logits = self.forward_logits(ids)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss


def build_model(h: Hyperparameters, rt: Runtime | None = None) -> GPT:
    """Init in fp32, every parameter rounded through bf16 (as the reference does); banks, bigram projection,
    ndim < 2 and control tensors then train in fp32, the rest in bf16. On the runtime's device and attention."""
    rt = rt or single_process_runtime()
    choice = rt.attention or AttentionChoice("sdpa", sdpa_attention, ())
    model = GPT(h, choice.fn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.bfloat16)
            if (name.endswith("_bank") or name == "bigram.proj.weight" or p.ndim < 2
                    or any(pat in name for pat in h.control_tensor_name_patterns)):
                p.data = p.data.float()
    model.attention_backend = choice.name
    return model.to(rt.device)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers
# Every parameter matches exactly one rule of OPTIMIZER_ROUTES, else build_optimizers fails naming it: Muon takes
# the four banks, AdamW "adam_tok" the token embedding and bigram table, AdamW "adam_scalar" the control tensors and
# the bigram projection.
# ---------------------------------------------------------------------------------------------------------------


NS5_COEFFS = (3.4445, -4.7750, 2.0315)
BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
OPTIMIZER_GROUPS = ("muon", "adam_tok", "adam_scalar")


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalize each matrix of G by quintic Newton-Schulz in bf16."""
    a, b, c = NS5_COEFFS
    X = G.to(torch.bfloat16).reshape(-1, *G.shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # the Gram matrix X Xᵀ is then the smaller one
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm per matrix
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if transposed else X).reshape(G.shape)


OPTIMIZER_ROUTES = (  # (what, rule(name, param, control patterns), optimizer); rules must be disjoint
    ("parameter bank", lambda n, p, pats: n in BANK_NAMES, "muon"),
    ("token embedding / bigram table", lambda n, p, pats: n in ("tok_emb.weight", "bigram.embed.weight"), "adam_tok"),
    ("model-level control or bigram projection",
     lambda n, p, pats: n in ("bigram.proj.weight", "bigram.scale", "smear.gate", "skip_weights"), "adam_scalar"),
    ("block control tensor (ndim < 2 or control-pattern name)",
     lambda n, p, pats: n.startswith("blocks.") and (p.ndim < 2 or any(pat in n for pat in pats)), "adam_scalar"),
)


def route_parameters(model: nn.Module, patterns=CONTROL_PATTERNS) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Optimizer group -> [(name, param)]; raises unless each matches exactly one rule."""
    routed = {g: [] for g in OPTIMIZER_GROUPS}
    bad = []
    for name, p in model.named_parameters():
        hits = [(what, group) for what, rule, group in OPTIMIZER_ROUTES if rule(name, p, patterns)]
        if len(hits) == 1:
            routed[hits[0][1]].append((name, p))
        else:
            bad.append(f"{name} {tuple(p.shape)}: " + ("no routing rule" if not hits else f"several rules {hits}"))
    if bad:
        raise ValueError("parameters not routed to exactly one optimizer (see OPTIMIZER_ROUTES):\n  " + "\n  ".join(bad))
    return routed


class _SlicedWork:
    """Work handle of the reduce-scatter fallback: wait for the all-reduce, then copy this rank's slice out."""

    def __init__(self, work, full: torch.Tensor, out: torch.Tensor):
        self.work, self.full, self.out = work, full, out

    def wait(self):
        self.work.wait()
        lo = dist.get_rank() * self.out.shape[0]
        self.out.copy_(self.full[lo:lo + self.out.shape[0]])


class BankCollectives:
    """SUM collectives of the banks (callers scale): torch 2.13's `*_single`, else the older names; a gloo build
    without reduce-scatter gets an all-reduce and a slice (`use_fallback`)."""

    use_fallback = False

    def __init__(self):
        self._rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor):
        if not self.use_fallback:
            try:
                return self._rs(out, full, op=dist.ReduceOp.SUM, async_op=True)
            except (RuntimeError, NotImplementedError):
                if dist.get_backend() != "gloo":
                    raise
                self.use_fallback = True  # refused at launch by this gloo build: switch for good
        return _SlicedWork(dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True), full, out)

    def all_gather(self, full: torch.Tensor, part: torch.Tensor):
        return self._ag(full, part, async_op=True)


# Parallel Muon, pipelined: launch() starts each bank's gradient reduce-scatter right after backward (the transfers
# overlap AdamW); finish() goes bank by bank, largest first: wait for this rank's shard of the summed gradient, take
# the mean, update the momentum shard, orthogonalize (NS5), start the all-gather of the updates, and apply the
# previous bank's update while this one travels. Invariant: every rank applies the same full update, from the mean
# gradient, so replicas never drift; a rank keeps momentum only for its own bank rows. One process: no collectives.
class ParallelMuon:
    def __init__(self, banks, lr: float, wd: float, momentum: float, ns_steps: int, rt: Runtime):
        self.world = rt.world_size if rt.distributed else 1
        rank = rt.rank if rt.distributed else 0
        ordered = sorted(banks, key=lambda item: -item[1].numel())  # stable: ties keep model order
        self.banks = [_Bank(name, p, self.world, rank) for name, p in ordered]
        self.base_lr = self.lr = lr
        self.wd, self.momentum, self.ns_steps = wd, momentum, ns_steps
        self.comm = BankCollectives() if self.world > 1 else None

    @torch.no_grad()
    def launch(self) -> None:
        for b in self.banks:
            if b.param.grad is None:
                b.grad[:b.size].zero_()
            else:
                b.grad[:b.size].copy_(b.param.grad)
            if self.comm is not None:
                b.work = self.comm.reduce_scatter(b.local, b.grad)

    @torch.no_grad()
    def finish(self) -> None:
        previous = None
        for b in self.banks:
            if b.work is not None:
                b.work.wait()
                b.local.mul_(1.0 / self.world)  # SUM -> mean over ranks
            b.momentum.mul_(self.momentum).add_(b.local)
            u = newton_schulz5(b.local.add(b.momentum, alpha=self.momentum), self.ns_steps)
            if self.comm is not None:  # collectives want a dense input
                b.work = self.comm.all_gather(b.update, u.contiguous())
            else:
                b.update = u
            if previous is not None:
                self._apply(previous)
            previous = b
        if previous is not None:
            self._apply(previous)

    def _apply(self, b: _Bank) -> None:
        """P <- P(1 - lr wd) - lr s U[:B] on every rank."""
        if b.work is not None:
            b.work.wait()
            b.work = None
        p = b.param.data
        if self.wd:
            p.mul_(1.0 - self.lr * self.wd)
        p.add_(b.update[:b.size].to(p.dtype), alpha=-self.lr * b.scale)

    def state_dict(self) -> dict:
        return {"world": self.world, "lr": self.lr, "momentum": self.momentum,
                "buffers": {b.name: b.momentum for b in self.banks}}

    def load_state_dict(self, sd: dict) -> None:
        if sd["world"] != self.world or set(sd["buffers"]) != {b.name for b in self.banks}:
            raise ValueError(f"Muon state is for world size {sd['world']} and banks {sorted(sd['buffers'])}; "
                             f"this run has {self.world} and {sorted(b.name for b in self.banks)}")
        self.lr, self.momentum = sd["lr"], sd["momentum"]
        for b in self.banks:
            b.momentum.copy_(sd["buffers"][b.name])


class _Bank:
    """One bank's bf16 Muon buffers: padded grad, local grad shard, momentum shard, padded update."""

    def __init__(self, name: str, param: torch.Tensor, world: int, rank: int):
        B, r, c = param.shape
        pad = -(-B // world) * world
        self.name, self.param, self.size, self.shard = name, param, B, pad // world
        self.scale = math.sqrt(max(1.0, r / c))  # of the un-transposed matrix
        self.grad = torch.zeros((pad, r, c), dtype=torch.bfloat16, device=param.device)  # padding rows stay 0
        self.local = self.grad[:B] if world == 1 else torch.zeros_like(self.grad[:self.shard])
        self.momentum = torch.zeros_like(self.local)
        self.update = torch.zeros_like(self.grad) if world > 1 else None
        self.work = None


def _cloned(obj):
    """Deep copy with every tensor cloned (optimizer state dicts alias live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def _average_grads(params: list[torch.Tensor], world: int) -> None:
    """Mean over ranks: one flat SUM all-reduce per dtype, then 1/W."""
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_sum(flat)
        flat.mul_(1.0 / world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


class Optimizers:
    """AdamW 'adam_tok' and 'adam_scalar' plus Parallel Muon, driven as one optimizer."""

    def __init__(self, adams: dict[str, torch.optim.Optimizer], muon: ParallelMuon):
        self.adams, self.muon = adams, muon
        self.adam_params = [p for opt in adams.values() for g in opt.param_groups for p in g["params"]]

    def step(self) -> None:
        """After backward and clipping: bank reduce-scatters, averaged AdamW, then Muon."""
        self.muon.launch()
        if self.muon.world > 1:
            _average_grads(self.adam_params, self.muon.world)
        for opt in self.adams.values():
            opt.step()
        self.muon.finish()

    def set_lr_scale(self, scale: float) -> None:
        for opt in self.adams.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        self.muon.lr = self.muon.base_lr * scale

    def set_muon_momentum(self, mu: float) -> None:
        self.muon.momentum = mu

    def zero_grad(self) -> None:
        for opt in self.adams.values():
            opt.zero_grad(set_to_none=True)
        for b in self.muon.banks:
            b.param.grad = None

    def state_dict(self) -> dict:
        """An independent copy."""
        return _cloned({"adam": {k: opt.state_dict() for k, opt in self.adams.items()}, "muon": self.muon.state_dict()})

    def load_state_dict(self, sd: dict) -> None:
        sd = _cloned(sd)  # AdamW keeps the loaded tensors: never alias the caller's snapshot
        for k, opt in self.adams.items():
            opt.load_state_dict(sd["adam"][k])
        self.muon.load_state_dict(sd["muon"])


def build_optimizers(model: nn.Module, h: Hyperparameters, rt: Runtime) -> Optimizers:
    routes = route_parameters(model, h.control_tensor_name_patterns)
    tok = dict(routes["adam_tok"])
    groups = {
        "adam_tok": [{"params": [tok[n]], "lr": h.tied_embed_lr, "base_lr": h.tied_embed_lr}
                     for n in ("tok_emb.weight", "bigram.embed.weight") if n in tok],
        "adam_scalar": [{"params": [p for _, p in routes["adam_scalar"]], "lr": h.scalar_lr, "base_lr": h.scalar_lr}],
    }
    adams = {k: torch.optim.AdamW(g, betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd,
                                  fused=True if rt.is_cuda else None)
             for k, g in groups.items() if any(gr["params"] for gr in g)}
    muon = ParallelMuon(routes["muon"], h.matrix_lr, h.muon_wd, h.muon_momentum_warmup_start,
                        h.muon_backend_steps, rt)
    return Optimizers(adams, muon)


def clip_gradients(model: nn.Module, max_norm: float):
    """Per rank, before any averaging; 0 disables."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# ---------------------------------------------------------------------------------------------------------------
# Training
# Schedules (pure), the averagers (EMA; SWA of EMA snapshots late in the warm-down), late QAT (the model's
# `qat_active`, flipped once), the step (shared by the compile warm-up, which is then undone exactly) and the timed
# loop. The clock runs only around steps (periodic validation, the evaluation's sliding_eval, pauses it); one MAX
# all-reduce per step gives every rank the same elapsed time, stop flag and non-finite flag.
# ---------------------------------------------------------------------------------------------------------------


def lr_scale(step: int, elapsed_ms: float, h: Hyperparameters) -> float:
    """1, then linear to 0 over the last WARMDOWN_ITERS (estimated) steps of the time budget (of ITERATIONS)."""
    if h.warmdown_iters <= 0:
        return 1.0
    if h.max_wallclock_seconds <= 0:
        start = h.iterations - h.warmdown_iters
        return (h.iterations - step) / h.warmdown_iters if step >= start else 1.0
    warmdown_ms = h.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(1000.0 * h.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(step: int, h: Hyperparameters) -> float:
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


def training_progress(step: int, elapsed_ms: float, h: Hyperparameters) -> float:
    if h.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * h.max_wallclock_seconds)
    return step / max(h.iterations, 1)


def cast_like(state: dict, reference: dict) -> dict:
    """Copy of `state` at the dtypes of `reference`."""
    return {k: v.detach().to(reference[k].dtype).clone() for k, v in state.items()}


class EMA:
    """ema <- decay * ema + (1 - decay) * theta after every step; fp32, no bias correction."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state(self) -> dict:
        return dict(zip(self.names, self.shadow))


class SWA:
    """Uniform fp32 average of the snapshots (EMA states) it is given."""

    def __init__(self):
        self.total: dict | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, snapshot: dict) -> None:
        if self.total is None:
            self.total = {k: v.detach().float().clone() for k, v in snapshot.items()}
        else:
            for k, v in snapshot.items():
                self.total[k].add_(v.float())
        self.count += 1

    def state(self) -> dict:
        if not self.count:
            raise RunFailed("no_swa_snapshots", "SWA has no snapshots: the run ended before the LR multiplier fell "
                                                "below SWA_LR_THRESHOLD; train longer or use EXPORT_WEIGHTS=ema")
        return {k: v / self.count for k, v in self.total.items()}


class StepStatus(NamedTuple):
    elapsed_ms: float  # the largest of any rank
    stop: bool  # wall-clock cap on some rank
    nonfinite: bool


def reduce_step_status(loss: torch.Tensor, elapsed_ms: float, stop: bool) -> StepStatus:
    """The step's one blocking sync: MAX over ranks of (elapsed ms, stop, non-finite loss)."""
    t = torch.full((3,), float(elapsed_ms), dtype=torch.float64, device=loss.device)
    t[1] = float(stop)
    t[2] = (~torch.isfinite(loss.detach())).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    elapsed, stop_flag, nonfinite = t.tolist()
    return StepStatus(elapsed, stop_flag > 0, nonfinite > 0)


def train_step(model, opt, loader, h: Hyperparameters, rt: Runtime, step: int, scale: float) -> torch.Tensor:
    """One global batch, clip, optimizer step; returns the mean loss."""
    accum, micro = h.grad_accum_steps(rt.world_size), h.micro_batch_tokens(rt.world_size)
    opt.zero_grad()
    total = torch.zeros((), device=rt.device)
    for i in range(accum):
        x, y = loader.next_batch(micro, h.train_seq_len)
        with autocast(rt):
            loss = model(x, y)
        (loss / accum).backward()
        total += loss.detach().float()
        if i + 1 < accum:
            loader.prefetch(micro, h.train_seq_len)
    opt.set_muon_momentum(muon_momentum(step, h))
    opt.set_lr_scale(scale)
    clip_gradients(model, h.grad_clip_norm)
    opt.step()
    return total / accum


def warmup_and_restore(model, base_model, opt, h: Hyperparameters, rt: Runtime) -> None:
    """WARMUP_STEPS real steps (compiling the plain and QAT graphs), then undone exactly."""
    if h.warmup_steps <= 0:
        return
    model_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    opt_state = opt.state_dict()  # already an independent copy
    loader = DistributedTokenLoader(find_shards(h.data_path, "train"), rt, h.vocab_size)
    for i in range(h.warmup_steps):
        base_model.qat_active = h.qat_enabled and i == h.warmup_steps - 1
        train_step(model, opt, loader, h, rt, i, 1.0)
        if h.warmup_steps <= 20 or (i + 1) % 10 == 0 or i + 1 == h.warmup_steps:
            log_event(None, warmup_step=f"{i + 1}/{h.warmup_steps}")
    base_model.qat_active = False
    base_model.load_state_dict(model_state, strict=True)
    opt.load_state_dict(opt_state)
    synchronize(rt)


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    raw: dict
    ema: EMA | None
    swa: SWA


def should_validate(step: int, last: bool, h: Hyperparameters) -> bool:
    """Every VAL_LOSS_EVERY steps (not at 0); after the last step with VAL_LAST_STEP=1."""
    if last:
        return h.val_last_step
    return h.val_loss_every > 0 and step > 0 and step % h.val_loss_every == 0


def validate_during_training(model, val, h, rt, step, train_ms) -> None:
    res = sliding_eval(model, val, h, rt)
    log_event(None, step=f"{step}/{h.iterations}", val_loss=f"{res.loss:.4f}", val_bpb=f"{res.bpb:.4f}",
              train_time=f"{train_ms:.0f}ms", step_avg=f"{train_ms / max(step, 1):.2f}ms")


def maybe_start_qat(base_model, step: int, elapsed_ms: float, scale: float, h: Hyperparameters) -> None:
    """Once the run is 1 - QAT_TIME_FRAC done, by the rank-agreed time: every rank switches on the same step."""
    progress = training_progress(step, elapsed_ms, h)
    if h.qat_enabled and not base_model.qat_active and progress >= 1.0 - h.qat_time_frac:
        base_model.qat_active = True
        log_event("qat_start", step=step, progress=f"{progress:.3f}", lr_scale=f"{scale:.4f}")


def finish_step(loss: torch.Tensor, h: Hyperparameters, rt: Runtime, *, base_model, ema, loader,
                elapsed_ms: float = 0.0, stop: bool = False) -> StepStatus:
    """After each step (benchmarks use it too): EMA update, next batch prefetched, the one blocking sync."""
    if ema is not None:
        ema.update(base_model)
    loader.prefetch(h.micro_batch_tokens(rt.world_size), h.train_seq_len)
    return reduce_step_status(loss, elapsed_ms, stop)


def train(model, base_model, opt, val: ValData, h: Hyperparameters, rt: Runtime, clock=time.perf_counter) -> TrainResult:
    """The timed loop: raw weights, EMA and SWA. QAT ends with it, so eval graphs compiled before it stay valid."""
    loader = DistributedTokenLoader(find_shards(h.data_path, "train"), rt, h.vocab_size)
    ema = EMA(base_model, h.ema_decay) if h.ema_enabled else None
    swa, cap_ms = SWA(), 1000.0 * h.max_wallclock_seconds
    step, train_ms, status = 0, 0.0, StepStatus(0.0, False, False)
    synchronize(rt)
    t0 = clock()
    while step < h.iterations and not status.stop:
        if should_validate(step, False, h):
            synchronize(rt)
            train_ms += 1000.0 * (clock() - t0)
            validate_during_training(model, val, h, rt, step, train_ms)
            t0 = clock()
        scale = lr_scale(step, status.elapsed_ms, h)
        maybe_start_qat(base_model, step, status.elapsed_ms, scale, h)
        loss = train_step(model, opt, loader, h, rt, step, scale)
        step += 1
        local_ms = train_ms + 1000.0 * (clock() - t0)
        status = finish_step(loss, h, rt, base_model=base_model, ema=ema, loader=loader, elapsed_ms=local_ms,
                             stop=cap_ms > 0 and local_ms >= cap_ms)
        if status.nonfinite:
            log_event("nonfinite_loss", step=step, train_loss=float(loss))
            raise RunFailed("diverged", f"training diverged: non-finite loss at step {step}; lower the learning "
                                        "rates (MATRIX_LR, SCALAR_LR, TIED_EMBED_LR) or check the data")
        if ema is not None and h.swa_enabled and scale < h.swa_lr_threshold and step % h.swa_every == 0:
            if swa.count == 0:
                log_event("swa_start", step=step)
            swa.add(ema.state())
        if step <= 10 or step % h.train_log_every == 0 or status.stop or step == h.iterations:
            log_event(None, step=f"{step}/{h.iterations}", train_loss=f"{float(loss):.4f}",
                      train_time=f"{status.elapsed_ms:.0f}ms", step_avg=f"{status.elapsed_ms / step:.2f}ms")
    synchronize(rt)
    train_ms += 1000.0 * (clock() - t0)
    base_model.qat_active = False
    if status.stop and step < h.iterations:
        log_event(STOPPING_EARLY, train_time=f"{train_ms:.0f}ms", step=f"{step}/{h.iterations}")
    log_peak_memory(rt, "train")
    raw = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    return TrainResult(step, train_ms, raw, ema, swa)


# ---------------------------------------------------------------------------------------------------------------
# Export
# Artifact = the int6 object of the unbanked state dict, encoded by ARTIFACT_CODEC (told apart by the first bytes);
# artifact + code bytes are checked against ARTIFACT_LIMIT_BYTES. BANK_LAYOUT (banks <-> per-layer matrices) and
# EXPORT_POLICY (first match wins) drive it; int6 rows use the model's int6 row grid. Every eval after training
# runs on the model loaded from these bytes.
# ---------------------------------------------------------------------------------------------------------------


def export_state(result: TrainResult, h: Hyperparameters) -> dict:
    """The weights EXPORT_WEIGHTS chooses."""
    log_event(None, export_weights=h.export_weights)
    if h.export_weights == "raw":
        return result.raw
    return cast_like(result.ema.state() if h.export_weights == "ema" else result.swa.state(), result.raw)


QUANT_FORMAT = "int6_per_row_v2"  # v2 records the model settings
QUANT_OBJECT_KEYS = ("quantized", "scales", "dtypes", "passthrough", "qmeta", "passthrough_orig_dtypes")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # zstd(torch.save(object))
RANS_MAGIC = b"I6rA"  # + header length (8 bytes LE) + lzma(torch.save(the object less its int6 values, plus
# "__rans__": order, shapes, histograms, values' sha256)) + the rANS words (uint32 LE)
ARTIFACT_MAGIC = dict(zip(ARTIFACT_CODECS, (RANS_MAGIC, ZSTD_MAGIC)))
INT6_SYMBOLS = 2 * INT6_MAX + 1  # int6 value v is coded as symbol v + INT6_MAX
INT6_TENSOR_CLIP_Q = 0.9999984  # int6 tensors that are not 2-D
BANK_LAYOUT = {  # bank -> per-layer names; slice k * num_layers + i of the bank is names[k] of layer i
    "qo_bank": ("blocks.{i}.attn.c_q.weight", "blocks.{i}.attn.proj.weight"),
    "kv_bank": ("blocks.{i}.attn.c_k.weight", "blocks.{i}.attn.c_v.weight"),
    "mlp_up_bank": ("blocks.{i}.mlp.fc.weight",),
    "mlp_down_bank": ("blocks.{i}.mlp.proj.weight",),
}


MODEL_CONFIG_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_base",
                       "rope_dims", "rope_train_len", "logit_softcap", "smeargate_enabled", "bigram_vocab_size",
                       "bigram_dim", "value_residual_enabled", "gated_attention_enabled", "xsa_last_n", "ln_scale")
# ^ the settings that change what the weights compute
ARTIFACT_CONFIG_NAMES = {"smeargate_enabled": "use_smeargate", "value_residual_enabled": "use_value_residual",
                         "gated_attention_enabled": "use_gated_attention"}
# ^ the format records these switches under their names from before the rename, so older artifacts still load


class ArtifactError(UserError):
    pass


def model_config(h: Hyperparameters) -> dict:
    return {name: getattr(h, name) for name in MODEL_CONFIG_FIELDS}


def bank_slice_names(bank: str, num_layers: int) -> list[str]:
    return [name.format(i=i) for name in BANK_LAYOUT[bank] for i in range(num_layers)]


def unbank_state(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Each bank replaced in place by its per-layer matrices (cloned: torch.save stores only the slice)."""
    flat = {}
    for key, t in state.items():
        if key not in BANK_LAYOUT:
            flat[key] = t
            continue
        names = bank_slice_names(key, num_layers)
        if t.ndim != 3 or t.shape[0] != len(names):
            raise ArtifactError(f"{key}: shape {tuple(t.shape)} does not hold {len(names)} slices "
                                f"for NUM_LAYERS={num_layers}")
        flat.update((name, t[j].clone()) for j, name in enumerate(names))
    return flat


def rebank_state(flat: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    owner = {name: bank for bank in BANK_LAYOUT for name in bank_slice_names(bank, num_layers)}
    state = {}
    for key, t in flat.items():
        bank = owner.get(key)
        if bank is None:
            state[key] = t
        elif bank not in state:
            names = bank_slice_names(bank, num_layers)
            missing = [n for n in names if n not in flat]
            if missing:
                raise ArtifactError(f"{bank}: {len(missing)} of {len(names)} slices missing (first: {missing[0]})")
            state[bank] = torch.stack([flat[n] for n in names])
    return state


def exports_as_float(name: str, t: torch.Tensor, h: Hyperparameters) -> bool:
    """Small tensors (<= KEEP_FLOAT_MAX_NUMEL) and the token embedding stay floats."""
    return t.numel() <= h.keep_float_max_numel or "tok_emb.weight" in name


EXPORT_POLICY = (  # first match wins: (kind, rule(name, tensor, h))
    ("passthrough", lambda n, t, h: not t.is_floating_point()),
    ("fp32_control", lambda n, t, h: exports_as_float(n, t, h) and any(p in n for p in h.control_tensor_name_patterns)),
    ("fp16", exports_as_float),
    ("int6_rows", lambda n, t, h: t.ndim == 2),
    ("int6_tensor", lambda n, t, h: True),
)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantize_int6_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor int6: clip at the INT6_TENSOR_CLIP_Q quantile of |w|, one fp32 scale."""
    w = t.detach().float()
    flat = w.abs().flatten()
    top = flat.topk(top_values_needed(flat.numel(), [INT6_TENSOR_CLIP_Q])).values
    clip = float(_row_quantile(top, flat.numel(), INT6_TENSOR_CLIP_Q))
    scale = torch.tensor(clip / INT6_MAX if clip > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -INT6_MAX, INT6_MAX)
    return q.to(torch.int8), scale


# Full-Hessian GPTQ (EXPORT_QUANTIZER=gptq): the export weights generate calibration text (no shard is read, legal
# after the clock stops); one forward records H = XᵀX of the input of every bank slice. GPTQ picks integer values on
# the clip search's row scales, columns in descending diag(H) order, each rounding error spread over the columns
# not yet rounded through the upper Cholesky factor of H⁻¹; a row keeps the clip search where that errs less.

@torch.no_grad()
def generate_calibration(model: GPT, h: Hyperparameters, rt: Runtime) -> torch.Tensor:
    n = len(range(rt.rank, h.gptq_calib_seqs, rt.world_size))
    g = torch.Generator(device=rt.device).manual_seed(h.gptq_calib_seed + rt.rank)
    ids = torch.randint(0, h.vocab_size, (n, 1), generator=g, device=rt.device)
    for _ in range(h.gptq_calib_len - 1 if n else 0):
        with autocast(rt):
            logits = model.forward_logits(ids)[:, -1].float()
        probs = torch.softmax(logits / h.gptq_calib_temperature, dim=-1)
        ids = torch.cat((ids, torch.multinomial(probs, 1, generator=g)), dim=1)
    return ids


class HessianRecorder(TorchFunctionMode):
    """While active, adds xᵀx of the input of every F.linear whose weight is a bank slice."""

    def __init__(self, model: GPT, num_layers: int):
        super().__init__()
        self.model, self.names, self.hessians = model, {}, {}
        self.slice_names = [bank_slice_names(bank, num_layers) for bank in BANK_LAYOUT]  # Banks field order
        for bank, names in zip(BANK_LAYOUT, self.slice_names):
            cols = getattr(model, bank).shape[-1]
            self.hessians.update((name, torch.zeros(cols, cols, device=model.qo_bank.device)) for name in names)

    def _watched_banks(self, dtype: torch.dtype) -> Banks:
        banks = GPT.banks(self.model, dtype)
        self.names = {w[j].data_ptr(): n for w, names in zip(banks, self.slice_names) for j, n in enumerate(names)}
        return banks

    def __enter__(self):
        self.model.banks = self._watched_banks
        return super().__enter__()

    def __exit__(self, *exc):
        del self.model.banks
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.names.get(args[1].data_ptr()) if func is F.linear else None
        if name is not None:
            x = args[0].reshape(-1, args[0].size(-1)).float()
            self.hessians[name].addmm_(x.T, x)
        return func(*args, **(kwargs or {}))


def gptq_quantize_matrix(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, damp: float,
                         block_size: int) -> torch.Tensor:
    """GPTQ's int6 values of w [rows, cols] on the row scales; a column whose input is always 0 gets diag 1."""
    w, hessian = w.float().clone(), hessian.clone()
    diag = hessian.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    perm = torch.argsort(diag, descending=True)
    w, hessian = w[:, perm], hessian[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q = torch.zeros_like(w)
    for lo in range(0, w.shape[1], block_size):
        hi = min(lo + block_size, w.shape[1])
        err = torch.zeros_like(w[:, lo:hi])
        for j in range(lo, hi):  # round in order, spreading each error over the block's later columns
            q[:, j] = torch.clamp(torch.round(w[:, j] / scale), -INT6_MAX, INT6_MAX)
            err[:, j - lo] = (w[:, j] - q[:, j] * scale) / hinv[j, j]
            w[:, j + 1:hi] -= err[:, j - lo:j - lo + 1] * hinv[j:j + 1, j + 1:hi]
        w[:, hi:] -= err @ hinv[lo:hi, hi:]
    return q[:, torch.argsort(perm)]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row proxy diag((W−Ŵ) H (W−Ŵ)ᵀ)."""
    d = w - w_hat
    return ((d @ hessian) * d).sum(dim=1)


class GPTQQuantizer:
    """GPTQ where a Hessian was recorded; the clip search elsewhere, on rows where it errs less, and where GPTQ
    fails (`gptq_fallback`)."""

    def __init__(self, hessians: dict, h: Hyperparameters, calib_ms: float):
        self.hessians, self.h, self.calib_ms = hessians, h, calib_ms
        self.matrices = self.rows = self.fallback_rows = self.fallback_matrices = 0
        self.quant_ms = 0.0

    def __call__(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_int6_rows(w, self.h.int6_clip_candidates)
        hessian = self.hessians.get(name)
        if hessian is None:
            return q, scale
        t0 = time.perf_counter()
        w, s = w.detach().float().to(hessian.device), scale.float().to(hessian.device)
        q_clip = q.to(hessian.device).float()
        try:
            q_gptq = gptq_quantize_matrix(w, hessian, s, self.h.gptq_damp, self.h.gptq_block_size)
            reason = None if bool(torch.isfinite(q_gptq).all()) else "nonfinite_values"
        except torch.linalg.LinAlgError:
            reason = "no_cholesky_factor"
        if reason is not None:
            self.fallback_matrices += 1
            log_event("gptq_fallback", matrix=name, reason=reason, quantizer="gptq_lite")
            return q, scale
        worse = output_error(w, q_gptq * s[:, None], hessian) > output_error(w, q_clip * s[:, None], hessian)
        best = torch.where(worse[:, None], q_clip, q_gptq).to(torch.int8).cpu()
        self.matrices, self.rows = self.matrices + 1, self.rows + w.shape[0]
        self.fallback_rows += int(worse.sum())
        self.quant_ms += 1000.0 * (time.perf_counter() - t0)
        return best, scale

    def log(self) -> str:
        h = self.h
        return log_event("gptq", calib_seqs=h.gptq_calib_seqs, calib_tokens=h.gptq_calib_seqs * h.gptq_calib_len,
                         matrices=self.matrices, rows=self.rows, fallback_rows=self.fallback_rows,
                         fallback_matrices=self.fallback_matrices,
                         calib_time=f"{self.calib_ms:.0f}ms", quant_time=f"{self.quant_ms:.0f}ms",
                         gptq_time=f"{self.calib_ms + self.quant_ms:.0f}ms")


GPTQ_HESSIAN_BATCH_SEQS = 8  # calibration sequences per forward of the Hessian pass


def calibrate_gptq(model: GPT, state: Mapping[str, torch.Tensor], h: Hyperparameters, rt: Runtime) -> GPTQQuantizer:
    """Every rank: generate with the export weights and record the Hessians (under autocast: FlashAttention)."""
    t0 = time.perf_counter()
    model.load_state_dict(state, strict=True)
    model.eval()
    tokens, recorder = generate_calibration(model, h, rt), HessianRecorder(model, h.num_layers)
    with torch.no_grad(), recorder, autocast(rt):
        for lo in range(0, tokens.size(0), GPTQ_HESSIAN_BATCH_SEQS):
            model.forward_logits(tokens[lo:lo + GPTQ_HESSIAN_BATCH_SEQS])
    all_reduce_sum(*recorder.hessians.values())
    synchronize(rt)
    return GPTQQuantizer(recorder.hessians, h, 1000.0 * (time.perf_counter() - t0))


def quantize_state(flat: Mapping[str, torch.Tensor], h: Hyperparameters, row_quantizer=None) -> tuple[dict, int]:
    """The int6 object of an unbanked CPU state dict and its payload bytes; row_quantizer replaces the clip search."""
    quantize_rows = row_quantizer or (lambda name, t: quantize_int6_rows(t, h.int6_clip_candidates))
    obj = {"__quant_format__": QUANT_FORMAT, **{k: {} for k in QUANT_OBJECT_KEYS}}
    for name, t in flat.items():
        kind = next(kind for kind, rule in EXPORT_POLICY if rule(name, t, h))
        dtype = str(t.dtype).removeprefix("torch.")
        if kind.startswith("int6"):
            rows = kind == "int6_rows"
            q, s = quantize_rows(name, t) if rows else quantize_int6_tensor(t)
            obj["quantized"][name], obj["scales"][name], obj["dtypes"][name] = q, s, dtype
            obj["qmeta"][name] = {"scheme": "per_row", "axis": 0} if rows else {"scheme": "per_tensor"}
            continue
        if kind == "fp32_control":
            t = t.float()
        elif kind == "fp16" and t.dtype in (torch.float32, torch.bfloat16):
            t = t.half()
        obj["passthrough"][name], obj["passthrough_orig_dtypes"][name] = t.contiguous(), dtype
    payload = sum(tensor_bytes(t) for part in ("quantized", "scales", "passthrough") for t in obj[part].values())
    return obj, payload


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"artifact records unknown dtype {name!r}")
    return dtype


def dequantize_state(obj: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for name, q in obj["quantized"].items():
        if obj["qmeta"].get(name, {}).get("scheme") not in ("per_row", "per_tensor"):
            raise ArtifactError(f"{name}: unknown quantization scheme {obj['qmeta'].get(name)!r}")
        flat[name] = dequantize_rows(q, obj["scales"][name]).to(_dtype(obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        flat[name] = t.to(_dtype(obj["passthrough_orig_dtypes"].get(name, str(t.dtype).removeprefix("torch."))))
    return flat


def require_package(name: str):
    """A codec's package; missing is a UserError."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"the artifact codec needs the `{name}` package (pip install -r requirements.txt)") from None


ARTIFACT_RAW_LIMIT_BYTES = 1 << 30  # decoded bound: ~35x the record artifact


def inflate_zstd(blob: bytes) -> bytes:
    """At most ARTIFACT_RAW_LIMIT_BYTES: refused before allocating when declared, else inflated 1 KiB at a time."""
    zstd = require_package("zstandard")
    try:
        declared = zstd.frame_content_size(blob)  # -1: not declared
        if declared > ARTIFACT_RAW_LIMIT_BYTES:
            raise ArtifactError(f"zstd frame declares {declared} decompressed bytes, more than the "
                                f"{ARTIFACT_RAW_LIMIT_BYTES} an artifact may hold; refused before decompressing")
        if declared >= 0:
            return zstd.ZstdDecompressor().decompress(blob)
        inflater, parts, size = zstd.ZstdDecompressor().decompressobj(), [], 0
        for i in range(0, len(blob), 1024):
            parts.append(inflater.decompress(blob[i:i + 1024]))
            size += len(parts[-1])
            if size > ARTIFACT_RAW_LIMIT_BYTES:
                raise ArtifactError(f"zstd stream expands to more than the {ARTIFACT_RAW_LIMIT_BYTES} bytes an "
                                    "artifact may hold; refused")
            if inflater.eof:
                return b"".join(parts)
    except zstd.ZstdError as e:
        raise ArtifactError(f"zstd stream is corrupt or truncated ({e})") from None
    raise ArtifactError("zstd stream is truncated")


def inflate_lzma(data: bytes) -> bytes:
    inflater = lzma.LZMADecompressor()
    try:
        raw = inflater.decompress(data, max_length=ARTIFACT_RAW_LIMIT_BYTES + 1)
    except lzma.LZMAError as e:
        raise ArtifactError(f"rans artifact header is corrupt ({e})") from None
    if len(raw) > ARTIFACT_RAW_LIMIT_BYTES:
        raise ArtifactError(f"rans artifact header expands to more than the {ARTIFACT_RAW_LIMIT_BYTES} bytes an "
                            "artifact may hold; refused")
    if not inflater.eof:
        raise ArtifactError("rans artifact header is truncated")
    return raw


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_object(raw: bytes) -> dict:
    """A torch.save dict read with weights_only; anything else raises ArtifactError."""
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors have no common base class
        kept = [line.strip() for line in str(e).splitlines()  # without the advice to retry with weights_only=False
                if line.strip() and "weights_only" not in line.lower().replace(" ", "_")]
        raise ArtifactError(f"decoded bytes are not a readable torch.save object ({type(e).__name__}: "
                            f"{'; '.join(kept) or 'refused'})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"artifact holds a {type(obj).__name__}, not the int6 object")
    return obj


def int6_symbol_model(counts: np.ndarray):
    constriction = require_package("constriction")
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def values_digest(values) -> str:
    digest = hashlib.sha256()
    for v in values:
        digest.update(np.ascontiguousarray(v, dtype=np.int8).tobytes())
    return digest.hexdigest()


def encode_rans(obj: dict) -> bytes:
    """Every tensor's int6 values rANS-coded with its own histogram, the rest lzma."""
    constriction = require_package("constriction")
    names = list(obj["quantized"])
    values = [obj["quantized"][n].numpy().astype(np.int32).ravel() for n in names]
    if any(v.size and np.abs(v).max() > INT6_MAX for v in values):
        raise ValueError(f"int6 values outside [-{INT6_MAX}, {INT6_MAX}]")
    counts = [np.bincount(v + INT6_MAX, minlength=INT6_SYMBOLS) for v in values]
    coder = constriction.stream.stack.AnsCoder()
    for v, c in zip(reversed(values), reversed(counts)):  # a stack: the last encoded is decoded first
        if v.size:
            coder.encode_reverse(v + INT6_MAX, int6_symbol_model(c))
    header = {k: v for k, v in obj.items() if k != "quantized"}
    header["__rans__"] = {"order": names, "shapes": [list(obj["quantized"][n].shape) for n in names],
                          "counts": [torch.from_numpy(c) for c in counts], "values_sha256": values_digest(values)}
    packed_header = lzma.compress(torch_bytes(header), preset=9 | lzma.PRESET_EXTREME)
    words = coder.get_compressed().astype("<u4").tobytes()
    return RANS_MAGIC + len(packed_header).to_bytes(8, "little") + packed_header + words


def decode_rans(blob: bytes) -> dict:
    constriction = require_package("constriction")
    start = len(RANS_MAGIC) + 8
    end = start + int.from_bytes(blob[len(RANS_MAGIC):start], "little")
    if end > len(blob) or (len(blob) - end) % 4:
        raise ArtifactError(f"rans artifact is truncated ({len(blob)} bytes)")
    obj = torch_object(inflate_lzma(blob[start:end]))
    coder_info = obj.pop("__rans__", None)
    if not isinstance(coder_info, dict) or not {"order", "shapes", "counts", "values_sha256"} <= set(coder_info):
        raise ArtifactError("rans artifact header lacks its coder tables")
    shapes = coder_info["shapes"]
    if not all(isinstance(d, int) and d >= 0 for shape in shapes for d in shape) or \
            sum(math.prod(shape) for shape in shapes) > ARTIFACT_RAW_LIMIT_BYTES // 4:  # decoded as int32
        raise ArtifactError("rans artifact header declares impossible or too many int6 values; refused")
    values = []
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(blob, dtype="<u4", offset=end).astype(np.uint32))
        for shape, counts in zip(coder_info["shapes"], coder_info["counts"]):
            n = math.prod(shape)
            values.append(coder.decode(int6_symbol_model(counts.numpy()), n) - INT6_MAX if n else np.zeros(0, np.int32))
    except ValueError as e:
        raise ArtifactError(f"rans artifact words are corrupt ({e})") from None
    if values_digest(values) != coder_info["values_sha256"] or not coder.is_empty():
        raise ArtifactError("rans artifact values do not match their recorded sha256 (corrupt words, or a "
                            "constriction version that models the histograms differently)")
    obj["quantized"] = {name: torch.from_numpy(v.astype(np.int8)).reshape(shape)
                        for name, v, shape in zip(coder_info["order"], values, coder_info["shapes"])}
    return obj


def encode_artifact(obj: dict, h: Hyperparameters) -> bytes:
    if h.artifact_codec == "rans":
        return encode_rans(obj)
    zstd = require_package("zstandard")
    return zstd.ZstdCompressor(level=h.zstd_level, write_checksum=True).compress(torch_bytes(obj))


def decode_artifact(blob: bytes) -> dict:
    """Any codec: the one way artifact bytes are read."""
    if bytes(blob[:4]) == RANS_MAGIC:
        return decode_rans(blob)
    if bytes(blob[:4]) != ZSTD_MAGIC:
        raise ArtifactError(f"not an artifact: starts with {bytes(blob[:4]).hex()}, expected one of "
                            f"{', '.join(f'{m.hex()} ({c})' for c, m in ARTIFACT_MAGIC.items())}")
    return torch_object(inflate_zstd(blob))


class PackStats(NamedTuple):
    payload_bytes: int
    raw_torch_bytes: int
    compressed_bytes: int  # the artifact
    baseline_bytes: int  # unbanked state dict at its own dtypes


def pack_artifact(state: Mapping[str, torch.Tensor], h: Hyperparameters, row_quantizer=None) -> tuple[bytes, PackStats]:
    flat = unbank_state({k: v.detach().cpu() for k, v in state.items()}, h.num_layers)
    obj, payload = quantize_state(flat, h, row_quantizer)
    obj["__model_config__"] = {ARTIFACT_CONFIG_NAMES.get(k, k): v for k, v in model_config(h).items()}
    blob = encode_artifact(obj, h)
    return blob, PackStats(payload, len(torch_bytes(obj)), len(blob), sum(tensor_bytes(t) for t in flat.values()))


def check_model_config(config: dict) -> None:
    """Every recorded value has its field's type (a str is no int) and together they are valid."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Hyperparameters)}
    for name, value in sorted(config.items()):
        want = {"bool": bool, "int": int, "float": (int, float)}[types[name]]
        if not isinstance(value, want) or (isinstance(value, bool) and types[name] != "bool"):
            raise ArtifactError(f"artifact records {name.upper()}={value!r} ({type(value).__name__}), "
                                f"expected {types[name]}")
    try:
        dataclasses.replace(Hyperparameters(), **config).validate()
    except UserError as e:
        raise ArtifactError(f"artifact records model settings that are not valid ({e})") from None


def check_state_matches(config: dict, state: Mapping[str, torch.Tensor]) -> None:
    """The tensors are exactly the parameters of the model the settings describe."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(Hyperparameters(), **config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(state[k].shape)}, model {expected[k]}" for k in sorted(set(state) & set(expected))
             if tuple(state[k].shape) != expected[k]]
    found = (("missing", sorted(set(expected) - set(state))), ("unexpected", sorted(set(state) - set(expected))),
             ("of the wrong shape", wrong))
    problems = [f"{len(names)} {what} (first: {names[0]})" for what, names in found if names]
    if problems:
        raise ArtifactError("tensors do not match the model its settings describe: " + "; ".join(problems))


def unpack_artifact(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model settings, banked CPU state dict); anything not our format raises ArtifactError."""
    obj = decode_artifact(blob)
    fmt = obj.get("__quant_format__")
    if fmt != QUANT_FORMAT:
        raise ArtifactError(f"artifact format {fmt!r} is not {QUANT_FORMAT!r}; re-export it with this script")
    missing = [k for k in (*QUANT_OBJECT_KEYS, "__model_config__") if not isinstance(obj.get(k), dict)]
    if missing:
        raise ArtifactError(f"artifact object lacks {missing}")
    fields = {stored: name for name, stored in ARTIFACT_CONFIG_NAMES.items()}
    config = {fields.get(k, k): v for k, v in obj["__model_config__"].items()}
    if sorted(config) != sorted(MODEL_CONFIG_FIELDS):
        raise ArtifactError(f"artifact records model settings {sorted(config)}, expected {sorted(MODEL_CONFIG_FIELDS)}")
    check_model_config(config)
    try:
        state = rebank_state(dequantize_state(obj), config["num_layers"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # a foreign object
        raise ArtifactError(f"artifact tensors are inconsistent ({type(e).__name__}: {e})") from None
    return config, state


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    """NaN or inf in a floating-point tensor fails the run."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunFailed("nonfinite_weights", f"{what} hold NaN or inf in {len(bad)} tensors (first: {bad[0]})")


class ArtifactReport(NamedTuple):
    path: str
    sha256: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    over_limit: bool
    stats: PackStats


def over_size_limit(total_bytes: int, limit: int) -> bool:
    """Code + compressed model may reach the limit, not exceed it."""
    return total_bytes > limit


def report_artifact_size(path: str, blob: bytes, code: CodeIdentity, h: Hyperparameters,
                         st: PackStats | None = None) -> ArtifactReport:
    """Size, sha256 and the limit check with the bytes of the file that runs."""
    model_bytes, digest = len(blob), hashlib.sha256(blob).hexdigest()
    total, limit = model_bytes + code.code_bytes, h.artifact_limit_bytes
    if st is not None:
        ratio = st.baseline_bytes / max(st.payload_bytes, 1)
        log_event("serialized", model_bytes=model_bytes, payload_bytes=st.payload_bytes,
                  raw_torch_bytes=st.raw_torch_bytes, payload_ratio=f"{ratio:.2f}")
    log0(f"{TOTAL_SUBMISSION} {total} bytes")
    log_event("artifact", path=path, sha256=digest, model_bytes=model_bytes, code_bytes=code.code_bytes,
              code=code.form, total_bytes=total, limit=limit, packed_total_bytes=model_bytes + code.packed_bytes)
    over = over_size_limit(total, limit)
    if over:
        log_event("artifact_over_limit", total_bytes=total, limit=limit, excess=total - limit)
    return ArtifactReport(path, digest, model_bytes, code.code_bytes, total, over, st)


def write_artifact(h: Hyperparameters, blob: bytes) -> None:
    """Atomically; if that fails, the bytes go next to the log (else to the temporary folder) and the run fails
    naming where."""
    try:
        return write_file_atomic(h.artifact_path, blob)
    except OSError as e:
        failed = [f"cannot write the artifact {h.artifact_path} ({errno_text(e)})"]
    for folder in (h.log_dir, tempfile.gettempdir()):
        rescue = os.path.join(folder, f"{h.run_id}.rescued.{os.path.basename(h.artifact_path)}")
        if not os.path.isdir(folder):
            continue
        try:
            write_file_atomic(rescue, blob)
        except OSError as e:
            failed.append(f"nor {rescue} ({errno_text(e)})")
            continue
        raise RunFailed("write_failed", f"{failed[0]}; the trained weights are saved in {rescue} (score them with "
                                        f"EVAL_ONLY=1 ARTIFACT_PATH={rescue})")
    raise RunFailed("write_failed", ", ".join(failed) + ": the trained weights are lost")


def export_artifact(state: Mapping[str, torch.Tensor], h: Hyperparameters, code: CodeIdentity,
                    row_quantizer=None) -> ArtifactReport:
    """Rank 0: pack, write, log the sizes and the limit check."""
    blob, st = pack_artifact(state, h, row_quantizer)
    write_artifact(h, blob)
    log_event("export", quantizer=h.export_quantizer, codec=h.artifact_codec, payload_bytes=st.payload_bytes,
              model_bytes=len(blob))
    if row_quantizer is not None:
        row_quantizer.log()
    return report_artifact_size(h.artifact_path, blob, code, h, st)


class LoadedArtifact(NamedTuple):
    path: str
    blob: bytes
    config: dict  # MODEL_CONFIG_FIELDS
    state: dict  # banked, on the CPU


def load_artifact(path: str, rt: Runtime | None = None) -> LoadedArtifact:
    """Read by rank 0 and broadcast (with `rt`); an unreadable or foreign file, or tensors that do not fit its
    settings, raise ArtifactError on every rank."""
    blob, problem = None, None
    if rt is None or rt.is_main:
        try:
            blob = Path(path).read_bytes()
        except OSError as e:
            problem = ArtifactError(f"{path}: cannot read artifact ({e.strerror}); check ARTIFACT_PATH")
    if rt is not None:
        blob = broadcast_bytes(blob, rt)
    if blob is None:
        raise problem or ArtifactError(f"{path}: rank 0 cannot read the artifact (its message says why)")
    try:
        config, state = unpack_artifact(blob)
        check_state_matches(config, state)
        return LoadedArtifact(path, blob, config, state)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def adopt_artifact_config(h: Hyperparameters, config: dict, env: Mapping[str, str]) -> Hyperparameters:
    """h with the artifact's model settings; an explicit setting with another value is refused."""
    conflicts = [f"{k.upper()}={format_setting(getattr(h, k))} (artifact: {format_setting(v)})"
                 for k, v in sorted(config.items()) if k.upper() in env and getattr(h, k) != v]
    if conflicts:
        raise UserError(f"EVAL_ONLY: {', '.join(conflicts)} conflict with the model recorded in {h.artifact_path}; "
                        "unset these settings (the artifact's are used)")
    adopted = dataclasses.replace(h, **config)
    adopted.validate()
    return adopted


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# Target p (1..N) is tokens[p], predicted from tokens[<p]. evaluate() hands each batch's log-probabilities to every
# scorer of the pass, so all scores of one set of weights share the logits. Once a chunk is scored on all ranks,
# after_chunk(start, end) may update state from its targets only: score first, then update.
# ---------------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    x: torch.Tensor  # [B, L] inputs
    sel: torch.Tensor  # [S] flat indices of the scored entries of x
    pos: torch.Tensor  # [S] their target positions
    prev: torch.Tensor  # [S] token before each target
    tgt: torch.Tensor  # [S] target token
    sel_pos: np.ndarray  # [S] target positions, on the host
    span: tuple[int, int]  # [lo, hi): this rank's targets of the chunk


class WindowTable(NamedTuple):
    """This rank's windows of one pass [n, 3], on host and device; every chunk's share padded to whole batches."""
    host: np.ndarray
    dev: torch.Tensor


class EvalResult(NamedTuple):
    loss: float
    bpb: float
    tokens: int
    bytes: int
    time_ms: float


# The batch geometry. A window (start, end, score_from) feeds tokens[start:end] and scores targets score_from..end;
# windows are rows of one int64 array [n, 3] (first input token, last target position, first scored target). Why
# every target is scored exactly once, with its window's context: plan_windows partitions 1..N into the windows'
# scored ranges, each target seeing at least seq_len − stride + 1 tokens (fewer only within the first seq_len);
# group_by_chunk cuts the partition at chunk boundaries, a straddling window becoming pieces with the same start
# (same context, disjoint ranges); split_for_rank gives each rank a contiguous share of each chunk; window_table pads
# shares to whole batches with empty windows (end < score_from); make_batch scores exactly score_from..end per row.
# Its rows are `length` tokens long, so a short window's row also reads tokens after its end: attention is causal
# and those positions are never scored, so no score sees a later token.
def plan_windows(num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Windows [n, 3] whose scored ranges partition 1..N in order; each window is maximal."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be in [1, seq_len={seq_len}]")
    if num_targets < 1:
        return np.zeros((0, 3), dtype=np.int64)
    first = min(seq_len, num_targets)
    w = np.empty((len(range(first + 1, num_targets + 1, stride)) + 1, 3), dtype=np.int64)
    w[0], w[1:, 2] = (0, first, 1), np.arange(first + 1, num_targets + 1, stride)
    np.minimum(w[1:, 2] + (stride - 1), num_targets, out=w[1:, 1])
    np.maximum(w[1:, 1] - seq_len, 0, out=w[1:, 0])
    return w


def split_for_rank(items, rank: int, world: int):
    """Contiguous, balanced share of rank."""
    base, extra = divmod(len(items), world)
    lo = rank * base + min(rank, extra)
    return items[lo:lo + base + (rank < extra)]


def group_by_chunk(windows: np.ndarray, chunk_tokens: int) -> list[tuple[int, int, np.ndarray]]:
    """[(first target, end target excl., windows)] for chunks [1+kC, 1+(k+1)C)."""
    c, pieces = chunk_tokens, windows
    k, k1 = (windows[:, 2] - 1) // c, (windows[:, 1] - 1) // c
    if (k1 > k).any():  # some window straddles a boundary
        n = k1 - k + 1
        rep = np.repeat(np.arange(len(windows)), n)
        k = k[rep] + np.arange(rep.size) - np.repeat(np.cumsum(n) - n, n)
        pieces = windows[rep]
        pieces[:, 1], pieces[:, 2] = np.minimum(pieces[:, 1], (k + 1) * c), np.maximum(pieces[:, 2], k * c + 1)
    total = int(windows[:, 1].max())
    cut = np.searchsorted(k, np.arange((total + c - 1) // c + 1)).tolist()
    return [(1 + i * c, min(1 + (i + 1) * c, total + 1), pieces[cut[i]:cut[i + 1]]) for i in range(len(cut) - 1)]


def window_table(shares: list, rows: int, device) -> tuple[WindowTable, list[int]]:
    """(table, offset of each share), each share padded to a multiple of `rows` windows."""
    sizes = np.array([len(share) for share in shares], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(-(-sizes // rows) * rows)])
    host = np.zeros((int(offsets[-1]), 3), dtype=np.int64)
    host[:, 2] = 1
    for share, o, m in zip(shares, offsets.tolist(), sizes.tolist()):
        host[o:o + m] = share
    return WindowTable(host, torch.from_numpy(host).to(device)), offsets.tolist()


def make_batch(tokens: torch.Tensor, table: WindowTable, lo: int, hi: int, length: int, span=(0, 0)) -> Batch:
    """Windows lo..hi-1 as a batch on the tokens' device, without a host sync."""
    w, wh, dev = table.dev[lo:hi], table.host[lo:hi], tokens.device
    counts_h = np.maximum(wh[:, 1] - wh[:, 2] + 1, 0)
    total = int(counts_h.sum())
    x = tokens[(w[:, :1] + torch.arange(length, device=dev)).clamp(max=tokens.numel() - 2)]
    counts = (w[:, 1] - w[:, 2] + 1).clamp(min=0)
    row = torch.arange(hi - lo, device=dev).repeat_interleave(counts, output_size=total)
    j = torch.arange(total, device=dev) - (counts.cumsum(0) - counts)[row]
    pos = w[row, 2] + j
    sel = row * length + (pos - 1 - w[row, 0])
    sel_pos = np.repeat(wh[:, 2] - np.cumsum(counts_h) + counts_h, counts_h) + np.arange(total)
    return Batch(x, sel, pos, tokens[pos - 1], tokens[pos], sel_pos, span)


class EvalTotals:
    """fp64 sums (nll nats, tokens, bytes); bpb only through bits_per_byte."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, nbytes: torch.Tensor) -> None:
        n = nll.new_full((), nll.numel(), dtype=torch.float64)
        self.sums += torch.stack([nll.double().sum(), n, nbytes])

    def running_bpb(self) -> float:
        """bpb so far on all ranks (a collective)."""
        s = self.sums.clone()
        all_reduce_sum(s)
        return bits_per_byte(float(s[0]), float(s[2]))

    def result(self, time_ms: float) -> EvalResult:
        nll, tokens, nbytes = self.sums.tolist()
        return EvalResult(nll / max(tokens, 1.0), bits_per_byte(nll, nbytes), int(tokens), int(nbytes), time_ms)


def model_nll(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    return -logp.gather(1, batch.tgt[:, None]).squeeze(1)


def evaluate(model, val: ValData, windows, scorers: dict, h: Hyperparameters, rt: Runtime, chunk_tokens=None,
             after_chunk=None, progress=None) -> dict[str, EvalResult]:
    """Chunk -> this rank's batches -> one forward -> every scorer -> its totals; after_chunk(start, end) once all
    ranks scored the chunk."""
    synchronize(rt)
    t0 = time.perf_counter()
    tokens, tables = val.tokens.to(rt.device), val.tables.to(rt.device)
    chunks = group_by_chunk(windows, chunk_tokens) if chunk_tokens else [(1, val.num_targets + 1, windows)]
    rows, length = h.eval_batch_windows, int((windows[:, 1] - windows[:, 0]).max())
    table, offsets = window_table([split_for_rank(c, rt.rank, rt.world_size) for _, _, c in chunks], rows, rt.device)
    totals, was_training = {name: EvalTotals(rt.device) for name in scorers}, model.training
    model.eval()
    for k, (c0, c1, _) in enumerate(chunks):
        live = table.host[offsets[k]:offsets[k + 1]]
        live = live[live[:, 1] >= live[:, 2]]  # this rank's scored ranges of the chunk: consecutive
        span = (int(live[0, 2]), int(live[-1, 1]) + 1) if len(live) else (0, 0)
        with torch.inference_mode(), autocast(rt):
            for i in range(offsets[k], offsets[k + 1], rows):
                batch = make_batch(tokens, table, i, i + rows, length, span)
                logits = model(batch.x)
                logp = F.log_softmax(logits.reshape(-1, logits.size(-1))[batch.sel].float(), dim=-1)
                nbytes = count_bytes(batch.prev, batch.tgt, tables).sum().double()
                for name, scorer in scorers.items():
                    totals[name].add(scorer(logp, batch), nbytes)
        if after_chunk is not None:
            all_reduce_sum(torch.zeros(1, device=rt.device))  # barrier: the chunk is scored everywhere
            after_chunk(c0, c1)
        if progress is not None:
            progress(k, len(chunks), totals)
    all_reduce_sum(*(t.sums for t in totals.values()))
    synchronize(rt)
    model.train(was_training)
    ms = 1000.0 * (time.perf_counter() - t0)
    return {name: t.result(ms) for name, t in totals.items()}


def sliding_eval(model, val: ValData, h: Hyperparameters, rt: Runtime) -> EvalResult:
    windows = plan_windows(val.num_targets, h.eval_seq_len, h.eval_stride)
    return evaluate(model, val, windows, {"model": model_nll}, h, rt)["model"]


ROUNDTRIP_EVAL_NAME = "final_int6_zstd_roundtrip"


def report_eval(name: str, r: EvalResult) -> list[str]:
    """`<name> val_loss val_bpb eval_time` and `<name>_exact` (+ the alias after the round trip)."""
    lines = [log_event(name, val_loss=f"{r.loss:.4f}", val_bpb=f"{r.bpb:.4f}", eval_time=f"{r.time_ms:.0f}ms")]
    names = [f"{name}_exact"] + ([LEADERBOARD_ALIAS] if name == ROUNDTRIP_EVAL_NAME else [])
    lines += [log_event(n, val_loss=f"{r.loss:.8f}", val_bpb=f"{r.bpb:.8f}") for n in names]
    return lines


# N-gram caches. Position p's order-n context is tokens[p-n+1:p]; update(tokens, start, end) counts targets
# [start, end) under their context of every order, stats() reads every order's counts at once. Exact mode keeps
# context key -> (count, dense id, distinct continuations) and pair key id*V + token -> count, so sum_v pair(c, v) =
# ctx(c). A context key packs the token ids and the order (bits 60..62) while they fit in 60 bits, else it is a
# splitmix64 chain with the sign bit set (two chained contexts of 62 M tokens coincide with probability < 1e-3; such
# a pair merely shares its counts, pairs included, so the distribution still sums to 1, unlike hashed mode).
# The sorted runs: a table is a list of runs, each sorted with unique keys, and every key lives in exactly one run,
# so a lookup is one searchsorted per run (absent keys read 0) and an update adds in place where keys are found. A
# chunk's new keys become a new run, merged into the previous one until that is LSM_GROWTH times larger: runs shrink
# geometrically (O(log N) of them) and each entry is copied O(log N) times in all (amortized; one chunk's merge may
# still reach the bottom run). Worst case 32 B per position per order (< 16 GB at 62 M tokens, orders 2..9).
_M1, _M2, _GOLDEN = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64, 0x9E3779B97F4A7C15 - 2**64
_HASHED = -2**63  # sign bit of a chained key: packed keys are >= 0


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift on int64


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _merge(old: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """One sorted run from two with disjoint keys, each entry straight to its place (old columns freed as copied)."""
    at = torch.searchsorted(old[0], new[0])  # each new key goes right before old entry `at`
    dest_new = at + torch.arange(at.numel(), device=at.device)
    dest_old = torch.zeros(old[0].numel() + 1, dtype=torch.long, device=at.device)
    dest_old = dest_old.index_add_(0, at, torch.ones_like(at)).cumsum_(0)[:-1]  # new keys before each old entry
    dest_old.add_(torch.arange(old[0].numel(), device=at.device))
    out = []
    for c, n in enumerate(new):
        o, old[c] = old[c], None
        t = o.new_empty(o.numel() + n.numel())
        t[dest_old], t[dest_new] = o, n.to(o.dtype)
        out.append(t)
        del o
    return out


def _compact(keep: torch.Tensor, count: int, *cols: torch.Tensor) -> list[torch.Tensor]:
    """cols[keep] in order, given count = keep.sum()."""
    dest = torch.where(keep, torch.cumsum(keep, 0) - 1, count)
    return [col.new_empty(count + 1).scatter_(0, dest, col)[:count] for col in cols]


def _count_distinct(keys: torch.Tensor, tgt: torch.Tensor, vocab_size: int) -> list[torch.Tensor]:
    """Distinct contexts (keys, counts) and pairs (context index, token, count); one host sync."""
    sk, perm = torch.sort(keys)
    lid = torch.cumsum(torch.cat([sk.new_ones(1, dtype=torch.bool), sk[1:] != sk[:-1]]), 0) - 1
    pk = torch.sort(lid * vocab_size + tgt[perm]).values
    pid = torch.cumsum(torch.cat([pk.new_ones(1, dtype=torch.bool), pk[1:] != pk[:-1]]), 0) - 1
    n_ctx, n_pair = (torch.stack([lid[-1], pid[-1]]) + 1).tolist()
    ones = torch.ones_like(sk)
    ctx_cnt, pair_cnt = sk.new_zeros(n_ctx).index_add_(0, lid, ones), sk.new_zeros(n_pair).index_add_(0, pid, ones)
    pairs = pk.new_empty(n_pair).scatter_(0, pid, pk)  # duplicates write equal values
    return [sk.new_empty(n_ctx).scatter_(0, lid, sk), ctx_cnt, pairs // vocab_size, pairs % vocab_size, pair_cnt]


LSM_GROWTH = 4  # see "The sorted runs"


class Found(NamedTuple):
    runs: list  # per run: (clamped index, present?)
    hit: torch.Tensor  # present in any run


class SortedRuns:
    """Exact map int64 key -> value columns as sorted runs (column 0 the keys); no host sync."""

    def __init__(self, value_dtypes: tuple[torch.dtype, ...], device):
        self.dtypes, self.device = value_dtypes, device
        self.runs: list[list[torch.Tensor]] = []

    @property
    def size(self) -> int:
        return sum(run[0].numel() for run in self.runs)

    def find(self, q: torch.Tensor) -> Found:
        runs, hit = [], torch.zeros_like(q, dtype=torch.bool)
        for run in self.runs:
            i = torch.searchsorted(run[0], q).clamp_(max=run[0].numel() - 1)
            h = run[0][i] == q
            runs.append((i, h))
            hit = hit | h
        return Found(runs, hit)

    def gather(self, col: int, found: Found) -> torch.Tensor:
        """Value column `col` of every query (0 where absent)."""
        out = torch.zeros_like(found.hit, dtype=torch.long)
        for run, (i, h) in zip(self.runs, found.runs):
            out = out + torch.where(h, run[col][i].long(), 0)  # at most one run holds each key
        return out

    def add(self, col: int, found: Found, amount: torch.Tensor) -> None:
        for run, (i, h) in zip(self.runs, found.runs):
            run[col].index_add_(0, i, torch.where(h, amount, 0).to(run[col].dtype))

    def insert(self, keys: torch.Tensor, values: tuple) -> None:
        """Sorted unique absent keys with their values as a new run, merged as needed."""
        if keys.numel() == 0:
            return
        self.runs.append([keys, *(v.to(d) for v, d in zip(values, self.dtypes))])
        while len(self.runs) >= 2 and self.runs[-2][0].numel() < LSM_GROWTH * self.runs[-1][0].numel():
            new, old = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(old, new))


class NgramStats(NamedTuple):
    """int64 counts at n positions per order: ctx [n, K] of the context (0 if unseen or p < order − 1), pair of
    it followed by the candidate(s) ([n, K] or [n, K, c]), types: its distinct continuations (exact mode)."""
    ctx: torch.Tensor
    pair: torch.Tensor
    types: torch.Tensor | None = None

    def backoff(self, min_order: int, min_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed rule's (order, min(pair, ctx) / ctx) at the highest order with ctx >= min_count (else 0, 0)."""
        K = self.ctx.size(1)
        top = ((self.ctx >= min_count) * torch.arange(1, K + 1, device=self.ctx.device)).amax(1)  # k + 1, 0: none
        k = (top - 1).clamp(min=0)[:, None]
        cc = self.ctx.gather(1, k).squeeze(1) * (top > 0)
        extra = (1,) * (self.pair.dim() - 2)
        pc = self.pair.gather(1, k.view(-1, 1, *extra).expand(-1, 1, *self.pair.shape[2:])).squeeze(1)
        p = torch.minimum(pc, cc.view(-1, *extra)).double() / cc.clamp(min=1).double().view(-1, *extra)
        return torch.where(top > 0, top + (min_order - 1), 0), p


class ExactNgramCache:
    """p_ngram(.|c) sums to 1 for every seen context."""

    def __init__(self, vocab_size: int, *, min_order: int, max_order: int, min_count: int, device):
        self.V, self.min_order, self.max_order, self.min_count = vocab_size, min_order, max_order, min_count
        self.bits = max(1, (vocab_size - 1).bit_length())
        self.packed = min(max_order - 1, 60 // self.bits)  # context lengths 1..packed are packed exactly
        j = torch.arange(1, self.packed + 1, device=device)
        self.shifts, self.tags = self.bits * (j - 1), (j + 1) << 60
        self.first_pos = torch.arange(min_order - 1, max_order, device=device)  # order n needs p >= n - 1
        self.ctx = SortedRuns((torch.int32, torch.int32, torch.int32), device)  # key -> count, dense id, types
        self.pairs = SortedRuns((torch.int32,), device)  # id*V + token -> count
        self.num_ids = 0

    def _context_keys(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Key [n, K] of each position's context of every order (garbage where p < order - 1)."""
        back = torch.arange(1, self.max_order, device=pos.device)
        tok = tokens[(pos[:, None] - back).clamp(min=0)]  # column j - 1: the token j places back
        key = (tok[:, :self.packed] << self.shifts).cumsum(1)  # disjoint bit fields: the sum is the bitwise or
        cols, chain = [key | self.tags], key[:, -1]
        for j in range(self.packed + 1, self.max_order):
            chain = _mix64(chain ^ ((tok[:, j - 1] + 1) * _GOLDEN))
            cols.append((chain | _HASHED)[:, None])
        return torch.cat(cols, 1)[:, self.min_order - 2:].contiguous()

    def _entries(self, tokens: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context key, target) of every (order, position) in [start, end) with such a context."""
        keys, tgt = self._context_keys(tokens, torch.arange(start, end, device=tokens.device)), tokens[start:end]
        if start >= self.max_order - 1:  # every order has a context: no slicing
            return keys.reshape(-1), tgt[:, None].expand_as(keys).reshape(-1)
        los = [max(0, n - 1 - start) for n in range(self.min_order, self.max_order + 1)]
        return (torch.cat([keys[lo:, k] for k, lo in enumerate(los)]), torch.cat([tgt[lo:] for lo in los]))

    @torch.inference_mode()  # the runs change in place
    def update(self, tokens: torch.Tensor, start: int, end: int) -> None:
        """Count targets [start, end) under their context of every order (2 host syncs)."""
        keys, tgt = self._entries(tokens, start, end)
        if keys.numel() == 0:
            return
        ctx, ctx_cnt, pair_ctx, pair_tgt, pair_cnt = _count_distinct(keys, tgt, self.V)
        found = self.ctx.find(ctx)
        self.ctx.add(1, found, ctx_cnt)
        fresh = ~found.hit
        new_ids = self.num_ids + torch.cumsum(fresh, 0) - 1
        pair = torch.where(found.hit, self.ctx.gather(2, found), new_ids)[pair_ctx] * self.V + pair_tgt
        pair_found = self.pairs.find(pair)
        self.pairs.add(1, pair_found, pair_cnt)
        types = torch.zeros_like(ctx_cnt).index_add_(0, pair_ctx, (~pair_found.hit).long())  # new continuations
        self.ctx.add(3, found, types)
        n_ctx, n_pair = torch.stack([fresh.sum(), (~pair_found.hit).sum()]).tolist()
        ctx, ctx_cnt, new_ids, types = _compact(fresh, n_ctx, ctx, ctx_cnt, new_ids, types)
        self.ctx.insert(ctx, (ctx_cnt, new_ids, types))
        pair, pair_cnt = _compact(~pair_found.hit, n_pair, pair, pair_cnt)
        pair, order = torch.sort(pair)  # ids are not in key order
        self.pairs.insert(pair, (pair_cnt[order],))
        self.num_ids += n_ctx

    def stats(self, tokens: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor) -> NgramStats:
        found = self.ctx.find(self._context_keys(tokens, pos))
        ctx = torch.where(pos[:, None] >= self.first_pos, self.ctx.gather(1, found), 0)
        extra = (1,) * (cand.dim() - 1)
        pair = self.ctx.gather(2, found).view(*ctx.shape, *extra) * self.V + cand.view(-1, 1, *cand.shape[1:])
        pair = torch.where(ctx.view(*ctx.shape, *extra) > 0, self.pairs.gather(1, self.pairs.find(pair)), 0)
        return NgramStats(ctx, pair, torch.where(ctx > 0, self.ctx.gather(3, found), 0))

    def probs(self, tokens: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor):
        return self.stats(tokens, pos, cand).backoff(self.min_order, self.min_count)


NGRAM_PRIMES = (36313, 27191, 51647, 81929, 131071, 174763, 233017, 283721, 347237, 409891, 479909, 557927,
                631553, 716279, 811207)


class HashedNgramCache:
    """The reference's hashed rule, comparison only: p = min(full, ctx) / max(ctx, 1) is no distribution."""

    def __init__(self, *, min_order: int, max_order: int, min_count: int, num_buckets: int, device):
        self.min_order, self.max_order, self.min_count, self.mask = min_order, max_order, min_count, num_buckets - 1
        self.ctx = torch.zeros(max_order - min_order + 1, num_buckets, dtype=torch.int32, device=device)
        self.full = torch.zeros_like(self.ctx)

    def _hash(self, tokens, pos, n):
        h = torch.zeros_like(pos)
        for k in range(n - 1):  # oldest context token first
            h = h ^ (tokens[(pos - (n - 1) + k).clamp(min=0)] * NGRAM_PRIMES[k % len(NGRAM_PRIMES)])
        return h

    def _full_key(self, h, tok, n):
        return (h ^ (tok * NGRAM_PRIMES[(n - 1) % len(NGRAM_PRIMES)])) & self.mask

    def update(self, tokens: torch.Tensor, start: int, end: int) -> None:
        for i, n in enumerate(range(self.min_order, self.max_order + 1)):
            pos = torch.arange(max(start, n - 1), end, device=tokens.device)
            h, one = self._hash(tokens, pos, n), torch.ones_like(pos, dtype=torch.int32)
            self.ctx[i].index_add_(0, h & self.mask, one)
            self.full[i].index_add_(0, self._full_key(h, tokens[pos], n), one)

    def stats(self, tokens: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor) -> NgramStats:
        """Bucket counts: collisions add up."""
        ctx, pair, extra = [], [], (1,) * (cand.dim() - 1)
        for i, n in enumerate(range(self.min_order, self.max_order + 1)):
            h = self._hash(tokens, pos, n)
            ctx.append(torch.where(pos >= n - 1, self.ctx[i][h & self.mask].long(), 0))
            pair.append(self.full[i][self._full_key(h.view(-1, *extra), cand, n)].long())
        return NgramStats(torch.stack(ctx, 1), torch.stack(pair, 1))

    def probs(self, tokens: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor):
        return self.stats(tokens, pos, cand).backoff(self.min_order, self.min_count)


def make_ngram_cache(h: Hyperparameters, device):
    kw = dict(min_order=h.ngram_min_order, max_order=h.ngram_max_order, min_count=h.ngram_min_count, device=device)
    if h.ngram_mode == "hashed":
        return HashedNgramCache(num_buckets=h.ngram_buckets, **kw)
    return ExactNgramCache(h.vocab_size, **kw)


def row_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


class NgramMixer:
    """prepare(stats of a chunk's targets) -> tensors; nll(logp, tgt, rows) -> -log p_final(target) (and learns);
    distribution(logits, stats of every candidate) -> p_final; after_chunk(); report(score) -> `ngram_mixer`."""

    kind = ""

    def __init__(self, h: Hyperparameters, device):
        self.h = h
        self.used = torch.zeros(h.ngram_max_order - h.ngram_min_order + 2, dtype=torch.float64, device=device)

    def count_used(self, top: torch.Tensor) -> None:
        """top [S]: 1 + index of the highest order used (0: the model alone)."""
        self.used.index_add_(0, top, torch.ones_like(top, dtype=torch.float64))

    def after_chunk(self) -> None:
        pass

    def learned(self) -> dict:
        return {}

    def report(self, score: str) -> None:
        all_reduce_sum(self.used)
        share = (self.used / self.used.sum().clamp(min=1)).tolist()
        used = {f"used_o{self.h.ngram_min_order + k}": f"{x:.4f}" for k, x in enumerate(share[1:])}
        log_event("ngram_mixer", mixer=self.kind, score=score, targets=int(self.used.sum()), **used, **self.learned())


class SeedMixer(NgramMixer):
    """The seed rule: alpha on the backed-off estimate grows with the model's entropy; 0 where unmatched."""

    kind = "seed"

    def __init__(self, h: Hyperparameters, device):
        super().__init__(h, device)
        mults = [0.0] * h.ngram_min_order + list(h.ngram_order_mults[:h.ngram_max_order - h.ngram_min_order + 1])
        self.mults = torch.tensor(mults, dtype=torch.float64, device=device)

    def alpha(self, entropy: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        h = self.h
        center = h.ngram_entropy_center - h.ngram_center_shift * (order - h.ngram_min_order)
        a = h.ngram_alpha_min + (h.ngram_alpha_max - h.ngram_alpha_min) * torch.sigmoid(
            h.ngram_entropy_scale * (entropy.double() - center))
        return (a * self.mults[order]).clamp(0.0, h.ngram_alpha_clip)

    def prepare(self, stats: NgramStats) -> tuple[torch.Tensor, torch.Tensor]:
        return stats.backoff(self.h.ngram_min_order, self.h.ngram_min_count)

    def nll(self, logp: torch.Tensor, tgt: torch.Tensor, rows: tuple) -> torch.Tensor:
        order, p_ngram = rows
        self.count_used(torch.where(order > 0, order - (self.h.ngram_min_order - 1), 0))
        lp_model = logp.gather(1, tgt[:, None]).squeeze(1).double()
        alpha = self.alpha(row_entropy(logp), order)  # log((1-a) p_model + a p_ngram) >= log((1-clip) p_model)
        mixed = torch.logaddexp(torch.log1p(-alpha) + lp_model, torch.log(alpha) + torch.log(p_ngram))
        return -torch.where(alpha > 0, mixed, lp_model)

    def distribution(self, logits: torch.Tensor, stats: NgramStats) -> torch.Tensor:
        order, p_ngram = self.prepare(stats)
        alpha = self.alpha(row_entropy(F.log_softmax(logits.float(), dim=-1)), order)[:, None]
        return (1 - alpha) * torch.softmax(logits.double(), dim=-1) + alpha * p_ngram


MIXER_COUNT_BINS, MIXER_TYPE_BINS, MIXER_ENTROPY_BINS, MIXER_ENTROPY_NATS = 12, 4, 4, 2.0


class LearnedMixer(NgramMixer):
    """Per-bucket weights over the model and the seen orders, learned from scored targets only (README: "The
    n-gram mixer")."""

    kind = "learned"

    def __init__(self, h: Hyperparameters, device):
        super().__init__(h, device)
        self.K = h.ngram_max_order - h.ngram_min_order + 1
        per_top = MIXER_COUNT_BINS * MIXER_TYPE_BINS * MIXER_ENTROPY_BINS
        self.per_top, buckets = per_top, (self.K + 1) * per_top
        prior = torch.full((self.K + 1,), (1 - h.ngram_mixer_prior) / self.K, dtype=torch.float64, device=device)
        prior[0] = h.ngram_mixer_prior
        self.weights = prior.repeat(buckets, 1)  # [buckets, 1 + K]
        self.grad, self.seen = torch.zeros_like(self.weights), torch.zeros(buckets, dtype=torch.float64, device=device)
        self.count = torch.zeros_like(self.seen)
        self.gain, self.chunk_gain = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
        self.guard_logit = math.log(h.ngram_mixer_guard / (1 - h.ngram_mixer_guard))

    def guard(self) -> torch.Tensor:
        """Posterior weight of the model alone (0-dim: no host sync)."""
        return torch.sigmoid(self.guard_logit - self.gain)

    def buckets(self, stats: NgramStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bucket without the entropy bin, components present, 1 + highest seen order index)."""
        seen = stats.ctx > 0
        top = (seen * torch.arange(1, self.K + 1, device=seen.device)).amax(1)
        k = (top - 1).clamp(min=0)[:, None]
        c, t = stats.ctx.gather(1, k).squeeze(1).clamp(min=1), stats.types.gather(1, k).squeeze(1)
        count_bin = torch.log2(c.double()).floor().long().clamp(max=MIXER_COUNT_BINS - 1)
        type_bin = (MIXER_TYPE_BINS * t // c).clamp(max=MIXER_TYPE_BINS - 1)
        bucket = ((top * MIXER_COUNT_BINS + count_bin) * MIXER_TYPE_BINS + type_bin) * MIXER_ENTROPY_BINS
        return bucket, torch.cat([torch.ones_like(seen[:, :1]), seen], 1), top

    @staticmethod
    def entropy_bin(logp: torch.Tensor) -> torch.Tensor:
        return (row_entropy(logp) / MIXER_ENTROPY_NATS).floor().long().clamp(0, MIXER_ENTROPY_BINS - 1)

    def prepare(self, stats: NgramStats) -> tuple:
        return (*self.buckets(stats), stats.pair.double() / stats.ctx.clamp(min=1).double())

    def nll(self, logp: torch.Tensor, tgt: torch.Tensor, rows: tuple) -> torch.Tensor:
        bucket, present, top, q = rows
        bucket = bucket + self.entropy_bin(logp)
        lp_model = logp.gather(1, tgt[:, None]).squeeze(1).double()
        w = self.weights[bucket] * present
        x = torch.cat([lp_model.exp()[:, None], q], 1)
        p_mix = (w * x).sum(1) / w.sum(1)
        matched = (top > 0).double()
        self.grad.index_add_(0, bucket, torch.where(present, x / p_mix[:, None], 1.0) * matched[:, None])
        self.count.index_add_(0, bucket, matched)
        self.chunk_gain += ((torch.log(p_mix) - lp_model) * matched).sum()  # log(p_mix / p_model)
        self.count_used(top)
        g = self.guard()
        return torch.where(top > 0, -torch.log(g * x[:, 0] + (1 - g) * p_mix), -lp_model)

    def distribution(self, logits: torch.Tensor, stats: NgramStats) -> torch.Tensor:
        bucket, present, _ = self.buckets(stats)
        w = self.weights[bucket + self.entropy_bin(F.log_softmax(logits.float(), dim=-1))] * present
        q = stats.pair.double() / stats.ctx.clamp(min=1).double()[:, :, None]
        p_model = torch.softmax(logits.double(), dim=-1)
        p_mix = (w[:, :1] * p_model + (w[:, 1:, None] * q).sum(1)) / w.sum(1, keepdim=True)
        g = self.guard()
        return g * p_model + (1 - g) * p_mix

    def after_chunk(self) -> None:
        all_reduce_sum(self.grad, self.count, self.chunk_gain)
        self.gain += self.chunk_gain
        step = (self.count / (self.count + self.h.ngram_mixer_smooth))[:, None]
        w = self.weights * (1 + step * (self.grad / self.count.clamp(min=1)[:, None] - 1))
        self.weights = w / w.sum(1, keepdim=True)
        self.seen += self.count
        for t in (self.grad, self.count, self.chunk_gain):
            t.zero_()

    def learned(self) -> dict:
        """Per highest seen order: the weights of the model and orders, averaged over buckets by targets."""
        out = {"model_alone": f"{float(self.guard()):.3g}", "buckets_used": int((self.seen > 0).sum())}
        for t in range(1, self.K + 1):
            rows = slice(t * self.per_top, (t + 1) * self.per_top)
            n = self.seen[rows]
            if n.sum() > 0:
                w = (n[:, None] * self.weights[rows, :t + 1]).sum(0)
                out[f"w_o{self.h.ngram_min_order + t - 1}"] = ",".join(f"{x:.3f}" for x in (w / w.sum()).tolist())
        return out


def ngram_mixer_kind(h: Hyperparameters) -> str:
    """The hashed mode is the reference's whole rule (with the seed mixer)."""
    return h.ngram_mixer if h.ngram_mode == "exact" else "seed"


def make_ngram_mixer(h: Hyperparameters, device) -> NgramMixer:
    return {"learned": LearnedMixer, "seed": SeedMixer}[ngram_mixer_kind(h)](h, device)


NGRAM_AUDIT_TOLERANCE = 1e-6


def audit_normalized(sums) -> bool:
    """Every audited sum within NGRAM_AUDIT_TOLERANCE of 1 (tools/make_record.py checks it too)."""
    return float(np.abs(np.asarray(sums, dtype=np.float64) - 1.0).max()) <= NGRAM_AUDIT_TOLERANCE


class NgramScorer:
    """Scorer + after_chunk hook: mix with tables of earlier chunks only, then update; audits sum_v p_final(v)."""

    def __init__(self, cache, mixer: NgramMixer, tokens: torch.Tensor, audit_positions: np.ndarray):
        self.cache, self.mixer, self.tokens, self.audit_pos = cache, mixer, tokens, audit_positions
        self.audit_sums = torch.zeros(len(audit_positions), dtype=torch.float64, device=tokens.device)
        self.audit_found = torch.zeros_like(self.audit_sums)
        self.span, self.prepared = None, ()

    def __call__(self, logp: torch.Tensor, batch: Batch) -> torch.Tensor:
        self._audit(batch.sel_pos, logp, batch.pos)
        return self.mixer.nll(logp, batch.tgt, self.lookup(batch.pos, batch.span))

    def lookup(self, pos: torch.Tensor, span: tuple[int, int]) -> tuple:
        """The mixer's inputs at pos within span (this rank's targets of the chunk, prepared once)."""
        if span != self.span:
            lo, hi = span
            at = torch.arange(lo, hi, device=self.tokens.device)
            self.prepared = self.mixer.prepare(self.cache.stats(self.tokens, at, self.tokens[lo:hi]))
            self.span = span
        rows = pos - span[0]
        return tuple(t[rows] for t in self.prepared)

    def full_distribution(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """p_final [n, V] at positions pos from their logits (or log-probs)."""
        cand = torch.arange(logits.size(-1), device=logits.device).expand(pos.numel(), -1)
        return self.mixer.distribution(logits, self.cache.stats(self.tokens, pos, cand))

    def _audit(self, sel_pos: np.ndarray, logits: torch.Tensor, pos: torch.Tensor) -> None:
        if not len(self.audit_pos):
            return
        j = np.minimum(np.searchsorted(self.audit_pos, sel_pos), len(self.audit_pos) - 1)
        rows = np.nonzero(self.audit_pos[j] == sel_pos)[0]
        if rows.size:  # host-side: no device sync
            r, slots = host_to_device(torch.from_numpy(np.stack((rows, j[rows]))), pos.device)
            self.audit_sums[slots] = self.full_distribution(logits[r], pos[r]).sum(-1)
            self.audit_found[slots] = 1.0

    def observe(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """-log p_final of the targets at pos outside a batched pass (the coder)."""
        tgt = self.tokens[pos]
        rows = self.mixer.prepare(self.cache.stats(self.tokens, pos, tgt))
        return self.mixer.nll(F.log_softmax(logits.float(), dim=-1), tgt, rows)

    def after_chunk(self, start: int, end: int) -> None:
        self.span = None
        self.mixer.after_chunk()
        if end < self.tokens.numel():
            self.cache.update(self.tokens, start, end)

    def audit_report(self, exact: bool) -> None:
        all_reduce_sum(self.audit_sums, self.audit_found)
        s = self.audit_sums[self.audit_found > 0].cpu().numpy()
        if not s.size:
            return
        log_event("ngram_audit", positions=s.size, sum_min=f"{s.min():.9f}", sum_median=f"{np.median(s):.9f}",
                  sum_max=f"{s.max():.9f}")
        if exact and not audit_normalized(s):
            raise RunFailed("ngram_audit", f"ngram_audit: exact n-gram mixture is not normalized (max |sum-1| = "
                                           f"{np.abs(s - 1.0).max():.3e} > {NGRAM_AUDIT_TOLERANCE:g}); the score "
                                           "would not be a code length")


def make_ngram_scorer(tokens: torch.Tensor, h: Hyperparameters, rt: Runtime) -> NgramScorer:
    audit = np.unique(np.linspace(1, tokens.numel() - 1, h.ngram_audit_positions).round().astype(np.int64))
    return NgramScorer(make_ngram_cache(h, rt.device), make_ngram_mixer(h, rt.device), tokens, audit)


# Score-first test-time training: chunk k is scored by weights adapted on chunks < k only; then (but for the last
# chunk) the weights train on whole EVAL_SEQ_LEN sequences of chunk k's targets, every token already scored.
def ttt_lr_at(k: int, num_chunks: int, base_lr: float) -> float:
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * k / (num_chunks - 1))) if num_chunks > 1 else base_lr


def ttt_sequences(start: int, end: int, seq_len: int) -> list[int]:
    """First input position of each whole sequence of chunk targets [start, end)."""
    return list(range(start - 1, end - seq_len, seq_len))


def freeze_first_blocks(model: nn.Module, num_blocks: int) -> list[tuple[nn.Parameter, list[int]]]:
    """Returns the (bank, rows) whose gradients must be zeroed."""
    if num_blocks <= 0:
        return []
    for block in model.blocks[:num_blocks]:
        block.requires_grad_(False)
    n, first = len(model.blocks), list(range(num_blocks))
    pairs = first + [n + i for i in first]
    return [(model.qo_bank, pairs), (model.kv_bank, pairs), (model.mlp_up_bank, first), (model.mlp_down_bank, first)]


# The fixed-shape TTT step: TTT_BATCH_SEQS sequences over all ranks, each rank's share as `rows` sequences
# [rows, T+1] whatever its size (missing rows read clamped tokens with weight 0). Invariants: every step on every
# rank has one shape (no recompile) and the same collectives; weights world/(num_seqs·T) make the SUM-reduced
# gradient the mean over the step's real tokens on any world size, so all ranks hold the same weights; indices are
# clamped below `end`, so no unscored token is read.
class ScoreFirstTTT:
    """The TTT hook: TTT_EPOCHS passes over the chunk's sequences in fixed-shape SGD steps."""

    def __init__(self, model, base: nn.Module, tokens: torch.Tensor, h: Hyperparameters, rt: Runtime):
        self.model, self.base, self.tokens, self.h, self.rt = model, base, tokens, h, rt
        self.num_chunks = -(-(tokens.numel() - 1) // h.ttt_chunk_tokens)
        self.frozen_rows = freeze_first_blocks(base, h.ttt_freeze_blocks)
        self.params = [p for p in base.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=h.ttt_lr, momentum=h.ttt_momentum)
        self.per_step = max(1, min(h.ttt_batch_seqs, h.ttt_chunk_tokens // h.eval_seq_len))  # a chunk's whole seqs
        self.rows = -(-self.per_step // rt.world_size)

    def counts(self) -> tuple[int, int]:
        frozen = sum(p[rows].numel() for p, rows in self.frozen_rows)
        frozen += sum(p.numel() for p in self.base.parameters() if not p.requires_grad)
        return sum(p.numel() for p in self.base.parameters()) - frozen, frozen

    def after_chunk(self, start: int, end: int) -> None:
        if end >= self.tokens.numel():  # the last chunk
            return
        k, (rank, world) = (start - 1) // self.h.ttt_chunk_tokens, (self.rt.rank, self.rt.world_size)
        for group in self.opt.param_groups:
            group["lr"] = ttt_lr_at(k, self.num_chunks, self.h.ttt_lr)
        seqs, step = ttt_sequences(start, end, self.h.eval_seq_len), self.h.ttt_batch_seqs
        with torch.enable_grad():
            for _ in range(self.h.ttt_epochs):
                for i in range(0, len(seqs), step):
                    self._step(split_for_rank(seqs[i:i + step], rank, world), len(seqs[i:i + step]), end)

    def _step(self, starts: list[int], num_seqs: int, end: int) -> None:
        T, dev = self.h.eval_seq_len, self.tokens.device
        r = torch.arange(self.rows, device=dev)
        idx = (starts[0] if starts else 0) + r[:, None] * T + torch.arange(T + 1, device=dev)
        seq = self.tokens[idx.clamp(max=end - 1)]
        with autocast(self.rt):
            nll = self.model(seq[:, :-1], seq[:, 1:], reduction="none")
        weight = (r < len(starts)).float()[:, None] * (self.rt.world_size / (num_seqs * T))
        self.opt.zero_grad(set_to_none=True)
        (nll.float() * weight).sum().backward()
        for bank, rows in self.frozen_rows:
            bank.grad[rows] = 0
        _average_grads(self.params, self.rt.world_size)  # SUM / W of (W x per-rank share) = the step's mean
        clip_gradients(self.base, self.h.ttt_grad_clip)
        self.opt.step()


NGRAM_SCORE_NAMES = {"exact": "ngram_eval", "hashed": "ngram_hashed_unnormalized"}


def chunk_progress(event: str, score: str, every: int):
    """progress(k, num, totals) logging running_bpb every `every` chunks."""
    t0 = time.perf_counter()

    def progress(k: int, num: int, totals: dict) -> None:
        if every > 0 and ((k + 1) % every == 0 or k + 1 == num):
            bpb = totals[score].running_bpb()
            log_event(event, chunk=f"{k + 1}/{num}", running_bpb=f"{bpb:.6f}",
                      elapsed=f"{time.perf_counter() - t0:.1f}s")
    return progress


def scored_pass(model, val: ValData, h: Hyperparameters, rt: Runtime, trainer=None) -> dict[str, EvalResult]:
    """One pass with one set of weights: 'model' and (NGRAM_ENABLED) 'ngram' from the same logits; `trainer`
    (TTT) adapts after each chunk."""
    val = ValData(val.tokens.to(rt.device), val.tables.to(rt.device))
    scorers, hooks = {"model": model_nll}, []
    if h.ngram_enabled:
        scorers["ngram"] = make_ngram_scorer(val.tokens, h, rt)
        hooks.append(scorers["ngram"].after_chunk)
    if trainer is not None:
        hooks.append(trainer.after_chunk)
        chunk, progress = h.ttt_chunk_tokens, chunk_progress("ttt_chunk", "model", h.ttt_log_every)
    else:
        chunk, progress = h.ngram_chunk_tokens, chunk_progress("ngram_chunk", "ngram", h.ngram_log_every)
    if not hooks:
        chunk, progress = None, None

    def after_chunk(start: int, end: int) -> None:
        for hook in hooks:
            hook(start, end)

    windows = plan_windows(val.num_targets, h.eval_seq_len, h.eval_stride)
    results = evaluate(model, val, windows, scorers, h, rt, chunk, after_chunk if hooks else None, progress)
    bad = [f"{name} val_loss:{r.loss} val_bpb:{r.bpb}" for name, r in results.items()
           if not (math.isfinite(r.loss) and math.isfinite(r.bpb))]
    if bad:  # no code length: nothing is reported
        raise RunFailed("nonfinite_score", f"non-finite score ({', '.join(bad)})")
    if h.ngram_enabled:
        scorers["ngram"].audit_report(exact=h.ngram_mode == "exact")
        scorers["ngram"].mixer.report(("ttt_" if trainer is not None else "") + NGRAM_SCORE_NAMES[h.ngram_mode])
    return results


def roundtrip_eval(model, val: ValData, h: Hyperparameters, rt: Runtime) -> dict[str, EvalResult]:
    if h.ngram_enabled:
        log_event("ngram_start", min_order=h.ngram_min_order, max_order=h.ngram_max_order, mode=h.ngram_mode,
                  chunk_tokens=h.ngram_chunk_tokens, mixer=ngram_mixer_kind(h))
    results = scored_pass(model, val, h, rt)
    report_eval(ROUNDTRIP_EVAL_NAME, results["model"])
    if "ngram" in results:
        report_eval(NGRAM_SCORE_NAMES[h.ngram_mode], results["ngram"])
    return results


def ttt_eval(model: nn.Module, val: ValData, h: Hyperparameters, rt: Runtime, compile_fn=None) -> dict:
    """The TTT pass, on a deep copy of `model`."""
    adapted = copy.deepcopy(model)
    runner = compile_fn(adapted) if compile_fn is not None else adapted
    trainer = ScoreFirstTTT(runner, adapted, val.tokens.to(rt.device), h, rt)
    log_event("ttt_start", chunks=trainer.num_chunks, chunk_tokens=h.ttt_chunk_tokens, lr=h.ttt_lr,
              epochs=h.ttt_epochs, batch_seqs=h.ttt_batch_seqs, seqs_per_step=trainer.per_step,
              momentum=h.ttt_momentum, grad_clip=h.ttt_grad_clip, freeze_blocks=h.ttt_freeze_blocks)
    unfrozen, frozen = trainer.counts()
    log_event("ttt_params", unfrozen=unfrozen, frozen=frozen)
    results = scored_pass(runner, val, h, rt, trainer)
    report_eval("legal_ttt", results["model"])
    if "ngram" in results:
        report_eval("ttt_" + NGRAM_SCORE_NAMES[h.ngram_mode], results["ngram"])
    return results


# ---------------------------------------------------------------------------------------------------------------
# main
# Orchestration only: config → runtime → header → data → model → warm-up → train → export → rebuild from the
# artifact bytes → one pass (round trip + n-gram) → TTT pass (TTT_ENABLED=1). An artifact over the limit fails the
# run after the evals.
# ---------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_header(h: Hyperparameters, rt: Runtime) -> CodeIdentity:
    """Settings, code identity, environment; source text and versions to the log file only."""
    code = code_identity()
    for line in h.log_lines():
        log0(line)
    log_event(None, code_bytes=code.code_bytes, code_sha256=code.code_sha256, code=code.form,
              source_sha256=code.source_sha256, packed_bytes=code.packed_bytes)
    log_event("runtime", device=rt.device.type, world_size=rt.world_size,
              grad_accum_steps=h.grad_accum_steps(rt.world_size), attention=rt.attention.name, compile=rt.use_compile,
              torch=torch.__version__)
    log_attention(rt, h)
    log_event(None, world_size=rt.world_size, grad_accum_steps=h.grad_accum_steps(rt.world_size))
    log_event("versions", python=sys.version.split()[0], numpy=np.__version__, console=False)
    log0(code.source + "\n" + "=" * 100, console=False)
    return code


def compile_model(model: nn.Module, use_compile: bool) -> nn.Module:
    return torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model


def diagnostic_evals(base_model, model, val, result: TrainResult, h, rt) -> None:
    """Only logged: never changes the exported choice."""
    candidates = {"raw": result.raw}
    if result.ema is not None:
        candidates["ema"] = cast_like(result.ema.state(), result.raw)
    if result.swa.count:
        candidates["swa"] = cast_like(result.swa.state(), result.raw)
    for name, state in candidates.items():
        base_model.load_state_dict(state, strict=True)
        res = sliding_eval(model, val, h, rt)
        report_eval(f"diag_eval_{name}", res)


def train_and_export(h, rt, val, code: CodeIdentity) -> tuple[bool, float]:
    """Returns (artifact over the limit?, wall time when training ended)."""
    base_model = build_model(h, rt)
    model = compile_model(base_model, rt.use_compile)
    log_event(None, model_params=sum(p.numel() for p in base_model.parameters()))
    opt = build_optimizers(base_model, h, rt)
    warmup_and_restore(model, base_model, opt, h, rt)
    result = train(model, base_model, opt, val, h, rt)
    t_end = time.perf_counter()  # post-training time from here
    if should_validate(result.steps, True, h):
        validate_during_training(model, val, h, rt, result.steps, result.train_time_ms)
    if h.diag_eval_candidates:
        diagnostic_evals(base_model, model, val, result, h, rt)
    state = export_state(result, h)
    check_finite_weights(state, f"the exported ({h.export_weights}) weights")  # never overwrite a good artifact
    quantizer = calibrate_gptq(base_model, state, h, rt) if h.export_quantizer == "gptq" else None
    over_limit, problem = False, None
    if rt.is_main:
        try:
            over_limit = export_artifact(state, h, code, quantizer).over_limit
        except RunFailed as e:
            problem = e
    if any_rank(problem is not None, rt.device):  # every rank learns whether rank 0 wrote the artifact
        raise problem or RunFailed("write_failed", "rank 0 could not write the artifact (its message says why)")
    return over_limit, t_end


def evaluate_artifact(art: LoadedArtifact, h, rt, val) -> None:
    check_finite_weights(art.state, f"the weights in {art.path}")
    model = build_model(h, rt)
    model.load_state_dict(art.state, strict=True)
    roundtrip_eval(compile_model(model, rt.use_compile), val, h, rt)
    if h.ttt_enabled:
        ttt_eval(model, val, h, rt, lambda m: compile_model(m, rt.use_compile))


EXIT_USER_ERROR, EXIT_OVER_LIMIT, EXIT_RUN_FAILED = 2, 3, 4  # 1 stays Python's own: a bug, with its traceback


def run() -> int:
    h = Hyperparameters.from_env(os.environ)
    rt = init_runtime(h)
    h.validate(rt.world_size)
    art = load_artifact(h.artifact_path, rt) if h.eval_only else None
    if art is not None:
        h = adopt_artifact_config(h, art.config, os.environ)
    setup_logging(h, rt)
    for name in check_unknown_settings(os.environ):
        log_event("env_ignored", name=name)
    rt = with_attention(rt, h)
    code = log_header(h, rt)
    seed_everything(h.seed)
    val = load_val_data(h, load_tokenizer(h))
    raise_if_log_failed(rt)
    over_limit, t_end = False, time.perf_counter()
    if art is not None:
        over_limit = report_artifact_size(art.path, art.blob, code, h).over_limit
    else:
        over_limit, t_end = train_and_export(h, rt, val, code)
        art = load_artifact(h.artifact_path, rt)
    evaluate_artifact(art, h, rt, val)
    log_peak_memory(rt, "eval")
    log_event(None, post_training_time=f"{1000.0 * (time.perf_counter() - t_end):.0f}ms")
    raise_if_log_failed(rt)
    if over_limit:
        log_event("run_failed", reason="artifact_over_limit", limit=h.artifact_limit_bytes)
    return EXIT_OVER_LIMIT if over_limit else 0


def fail_run(reason: str, message: str, code: int) -> int:
    message = " ".join(message.split())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
        log_event("run_failed", console=False, reason=reason, detail=message)
    return code


def main() -> None:
    """A user error (exit 2), a failed run (4) or SIGINT/SIGTERM (128 + signal) ends the run with one line; over the
    limit exits 3 after the evals; a bug keeps its traceback (1)."""
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    LOG.path = LOG.failure = None  # nothing of an earlier run in this process: neither its log nor its failure
    try:
        code = run()
    except UserError as e:
        code = fail_run("user_error", str(e), EXIT_USER_ERROR)
    except RunFailed as e:
        code = fail_run(e.reason, str(e), EXIT_RUN_FAILED)
    except RunInterrupted as e:
        code = fail_run("interrupted", str(e), e.exit_code)
    finally:  # a caller's own handlers come back
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    shutdown(code)


def shutdown(code: int) -> None:
    """Only 0 and EXIT_OVER_LIMIT (all ranks there) pass a barrier; gloo runs end with os._exit once flushed
    (torch 2.13's teardown intermittently aborts)."""
    if dist.is_available() and dist.is_initialized():
        cuda = dist.get_backend() == "nccl"
        finished = code in (0, EXIT_OVER_LIMIT)
        if finished:
            dist.barrier()
            dist.destroy_process_group()
        if not cuda or not finished:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
