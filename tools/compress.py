"""Check a score by compression: range-code validation tokens with exactly the distributions the evaluator scores,
decode them back, and compare the file's size with the score.

  python3 tools/compress.py encode --artifact A [--tokens K | --text FILE] [--ngram] [--ttt] -o OUT
  python3 tools/compress.py decode --artifact A IN -o TEXT

Settings come from the environment exactly as for train_gpt.py (DATA_PATH, TOKENIZER_PATH, the model shape,
EVAL_SEQ_LEN, EVAL_STRIDE, NGRAM_*, TTT_*, ...). encode stores every non-default setting that can change a
distribution in the file's header and decode uses the header's, so decoding needs only the file, the artifact
(sha256 checked) and the tokenizer (sha256 checked; --tokenizer or TOKENIZER_PATH if it moved). encode decodes the
file it wrote and reports, for the same K targets: the evaluator's score in bits (train_gpt's own pass on those
targets, roundtrip_eval or ttt_eval: the sum that val_bpb divides by the bytes), the coded size in bits (payload,
and the whole file with its header), the overhead per token, bits per byte of each, and whether the decoded text is
byte-identical. --json PATH|- also writes the report as JSON.

Distributions. Target p (1..K) is predicted as evaluate() predicts it: by the window that scores it in
plan_windows(K, EVAL_SEQ_LEN, EVAL_STRIDE), split at chunk boundaries by group_by_chunk (pieces keep their start, so
every target keeps its context); the model's fp32 soft-capped logits, then an fp64 softmax, or with --ngram the
exact n-gram mixture NgramScorer.full_distribution with the tables of earlier chunks only. Once a target is coded
the n-gram mixer records it (NgramScorer.observe, what the evaluator's batches record); after each chunk the
evaluator's own hooks run: the mixer's learning step and the n-gram table update, then (--ttt) ScoreFirstTTT's
training step on a copy of the model. Chunks are NGRAM_CHUNK_TOKENS, or TTT_CHUNK_TOKENS with --ttt, as in the script's passes. The fp64
distribution becomes integer frequencies with total 2^24 and every token >= 1 (floor(p (2^24 - V)) + 1, the rest to
the first most probable token), coded by an exact integer arithmetic coder (64-bit low/high; a carry never reaches
emitted bits: an interval straddling the middle is narrowed and its bit deferred, "bit-plus-follow"). A token of
probability p costs -log2 p + O(V / 2^24) bits; the file adds a few bits to end the code, and the header.

Determinism (why decoding rebuilds every frequency bit for bit). The decoder knows only the tokens before p, so it
forwards p's window with the unknown positions filled with 0. Encoder and decoder forward exactly one window of
shape [1, L] (L = the longest window, the length evaluate() pads to) through the same eager CPU kernels. Every op of
the model is causal and acts row by row (linear layers, norms, rotary, causal attention whose masked scores add
exact zeros, SmearGate and BigramHash read only the previous token), and a CPU kernel given the same shape, thread
count and instruction set runs the same reduction order, so the logits at position p - 1 do not depend on what
follows. The distribution is then computed from that one row ([1, V]) with the same ops on both sides, and TTT
steps see the same tokens and weights on both sides. This fails on CUDA (atomics, algorithms picked by shape and
free memory), under torch.compile (the encoder's and decoder's graphs may fuse differently) and across torch
versions, instruction sets or thread counts. So the tool runs eager on the CPU only (it refuses DEVICE=cuda and
COMPILE=1), with torch.use_deterministic_algorithms; the header records the thread count (--threads, default 1;
the decoder uses it), the torch version and CPU capability (the decoder refuses others); and both sides first check
on the artifact that a repeated forward is bit-identical and that changing positions >= m leaves the logits before
m bit-identical. The decoder finally checks the sha256 of the decoded tokens against the header's.

Cost. Encoding forwards each window once (~K / EVAL_STRIDE forwards of [1, L]); decoding is sequential, one [1, L]
forward per token (K forwards; with --ngram also one lookup of V candidates per token). encode prints the measured
time of one forward and the resulting decode estimate; the default K is small (1000). One thread is the default:
these small forwards run fastest without thread hand-offs.

Errors (a corrupted file, a wrong artifact or tokenizer, an artifact whose logits are not finite, text with no
bytes to code, an output path that is one of the inputs, settings that cannot code): one `error:` line on stderr,
exit 2, nothing written. A failed check (logits not bit-reproducible on this machine, decoded tokens that differ
from the encoded ones): one `error:` line, exit 4. Exit codes: tools/toolkit.py. `--json PATH|-` as in every tool
(with `-` only the JSON goes to stdout).
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402
from logparse import emit  # noqa: E402

MAGIC = b"PGAC"
FORMAT_VERSION = 1
FREQ_BITS = 24
FREQ_TOTAL = 1 << FREQ_BITS
STATE_BITS = 64
DEFAULT_TOKENS = 1000
FLAG_NGRAM, FLAG_TTT = 1, 2
PAD_TOKEN = 0  # what the decoder feeds at positions it has not decoded yet (never read: the model is causal)
# settings that do not change any distribution (paths to data and outputs, identifiers) stay out of the header
UNCODED_SETTINGS = {"run_id", "log_dir", "data_path", "artifact", "artifact_path", "eval_only", "val_max_tokens"}


class Window(NamedTuple):
    """A row of plan_windows: the model sees tokens[start:end], predicts start+1..end, targets >= score_from count."""
    start: int
    end: int
    score_from: int


class CompressError(toolkit.ToolError):
    """A problem the user can fix (file, artifact, tokenizer, settings): one `error:` line on stderr, exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# Exact arithmetic coder: 64-bit low/high in Python integers; an interval straddling the middle is narrowed by
# shifting and remembered as pending bits (bit-plus-follow), so no carry ever propagates into emitted bytes.
# ---------------------------------------------------------------------------------------------------------------

_HALF = 1 << (STATE_BITS - 1)
_QUARTER = 1 << (STATE_BITS - 2)
_TOP = (1 << STATE_BITS) - 1


def _narrow(low: int, high: int, lo: int, hi: int, total: int) -> tuple[int, int]:
    """Sub-interval [cum_lo, cum_hi) / total of [low, high]: exact integer arithmetic, non-empty while range > total."""
    span = high - low + 1
    return low + span * lo // total, low + span * hi // total - 1


class BitWriter:
    def __init__(self):
        self.out, self.acc, self.count = bytearray(), 0, 0

    def put(self, bit: int, repeat: int = 1) -> None:
        for _ in range(repeat):
            self.acc = (self.acc << 1) | bit
            self.count += 1
            if self.count == 8:
                self.out.append(self.acc)
                self.acc, self.count = 0, 0

    def getvalue(self) -> bytes:
        tail = bytes([self.acc << (8 - self.count)]) if self.count else b""
        return bytes(self.out) + tail


class ArithmeticEncoder:
    def __init__(self):
        self.low, self.high, self.pending, self.bits = 0, _TOP, 0, BitWriter()

    def _emit(self, bit: int) -> None:
        self.bits.put(bit)
        self.bits.put(1 - bit, self.pending)
        self.pending = 0

    def encode(self, lo: int, hi: int, total: int) -> None:
        low, high = _narrow(self.low, self.high, lo, hi, total)
        while True:
            if high < _HALF:
                self._emit(0)
            elif low >= _HALF:
                self._emit(1)
                low, high = low - _HALF, high - _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                self.pending += 1
                low, high = low - _QUARTER, high - _QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
        self.low, self.high = low, high

    def finish(self) -> bytes:
        """Two more bits pick a point inside [low, high] whatever bits follow (the decoder reads zeros)."""
        self.pending += 1
        self._emit(0 if self.low < _QUARTER else 1)
        return self.bits.getvalue()


class ArithmeticDecoder:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0
        self.low, self.high, self.value = 0, _TOP, 0
        for _ in range(STATE_BITS):
            self.value = (self.value << 1) | self._bit()

    def _bit(self) -> int:
        i, self.pos = self.pos, self.pos + 1
        return (self.data[i >> 3] >> (7 - (i & 7))) & 1 if (i >> 3) < len(self.data) else 0

    def decode(self, cum: np.ndarray) -> int:
        """The symbol s with cum[s] <= scaled value < cum[s + 1]; cum is cumulative frequencies [V + 1]."""
        total, span = int(cum[-1]), self.high - self.low + 1
        scaled = ((self.value - self.low + 1) * total - 1) // span
        s = int(np.searchsorted(cum, scaled, side="right")) - 1
        low, high = _narrow(self.low, self.high, int(cum[s]), int(cum[s + 1]), total)
        value = self.value
        while True:
            if high < _HALF:
                pass
            elif low >= _HALF:
                low, high, value = low - _HALF, high - _HALF, value - _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                low, high, value = low - _QUARTER, high - _QUARTER, value - _QUARTER
            else:
                break
            low, high, value = 2 * low, 2 * high + 1, (2 * value) | self._bit()
        self.low, self.high, self.value = low, high, value
        return s


def frequencies(p: torch.Tensor) -> np.ndarray:
    """Cumulative integer frequencies [V + 1] of an fp64 distribution [V]: floor(p (T - V)) + 1 per token, the
    remainder to the first most probable token, so cum[-1] = T = 2^24 and every token has frequency >= 1."""
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise RuntimeError("distribution has negative or non-finite entries; it is not a code")
    f = torch.floor(p * (FREQ_TOTAL - p.numel())).to(torch.int64) + 1
    f[int(torch.argmax(p))] += FREQ_TOTAL - int(f.sum())
    cum = np.zeros(p.numel() + 1, dtype=np.int64)
    np.cumsum(f.numpy(), out=cum[1:])
    return cum


# ---------------------------------------------------------------------------------------------------------------
# File format: MAGIC, then a fixed header, the settings (zlib JSON), the platform string, the coded bits and a
# CRC-32 of everything before it.
# ---------------------------------------------------------------------------------------------------------------

_FIXED = struct.Struct("<4sBBBIIH32s32s32sHB")


class Header(NamedTuple):
    flags: int
    num_targets: int
    first_token: int
    threads: int
    artifact_sha256: bytes
    tokenizer_sha256: bytes
    tokens_sha256: bytes  # of the K + 1 token ids (int64 little-endian): proves the decode
    settings: dict  # {ENV_NAME: value} of every non-default setting that can change a distribution
    platform: str  # torch version and CPU capability: the kernels that computed the logits


def pack_file(hd: Header, payload: bytes) -> bytes:
    settings = zlib.compress(json.dumps(hd.settings, sort_keys=True, separators=(",", ":")).encode(), 9)
    platform = hd.platform.encode()
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, hd.flags, FREQ_BITS, hd.num_targets, hd.first_token, hd.threads,
                       hd.artifact_sha256, hd.tokenizer_sha256, hd.tokens_sha256, len(settings), len(platform))
    body = head + settings + platform + payload
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_file(blob: bytes, name: str) -> tuple[Header, bytes]:
    """(header, coded bits); CompressError on anything malformed or corrupted."""
    if len(blob) < _FIXED.size + 4 or blob[:4] != MAGIC:
        raise CompressError(f"{name}: not a compress.py file (bad magic or shorter than its header)")
    body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
    if zlib.crc32(body) != crc:
        raise CompressError(f"{name}: corrupted (CRC-32 mismatch); re-create it with `compress.py encode`")
    _, version, flags, freq_bits, k, first, threads, a_sha, t_sha, k_sha, n_set, n_plat = _FIXED.unpack_from(body)
    if version != FORMAT_VERSION or freq_bits != FREQ_BITS:
        raise CompressError(f"{name}: format version {version}/{freq_bits} bits, this tool reads "
                            f"{FORMAT_VERSION}/{FREQ_BITS}")
    at = _FIXED.size
    settings = json.loads(zlib.decompress(body[at:at + n_set]))
    platform = body[at + n_set:at + n_set + n_plat].decode()
    return Header(flags, k, first, threads, a_sha, t_sha, k_sha, settings, platform), body[at + n_set + n_plat:]


def sha256_file(path: str, what: str) -> bytes:
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError as e:
        raise CompressError(f"{path}: cannot read {what} ({e.strerror})") from None


def write_output(path: str, data: bytes) -> None:
    try:
        toolkit.write_file_atomic(path, data)
    except OSError as e:
        raise CompressError(f"-o {path}: cannot write ({e.strerror})") from None


def tokens_sha256(tokens: torch.Tensor) -> bytes:
    return hashlib.sha256(tokens.to(torch.int64).numpy().astype("<i8").tobytes()).digest()


def platform_id() -> str:
    return f"torch {torch.__version__} cpu {torch.backends.cpu.get_cpu_capability()}"


def coded_settings(h: tg.Hyperparameters) -> dict:
    """{ENV_NAME: text} of every setting that differs from the default and can change a distribution."""
    default = tg.Hyperparameters()
    return {f.name.upper(): toolkit.format_setting(getattr(h, f.name)) for f in dataclasses.fields(h)
            if f.name not in UNCODED_SETTINGS and getattr(h, f.name) != getattr(default, f.name)}


# ---------------------------------------------------------------------------------------------------------------
# Settings, model, tokens and text
# ---------------------------------------------------------------------------------------------------------------


def settings_from(env) -> tg.Hyperparameters:
    """train_gpt's Hyperparameters from env; the coder needs the eager CPU path (see the module docstring)."""
    h = tg.Hyperparameters.from_env(env)  # a bad setting is a UserError: main's one line, exit 2
    if h.device == "cuda" or h.compile == "1":
        raise CompressError(f"DEVICE={h.device} COMPILE={h.compile}: compress.py needs bit-identical logits in the "
                            "encoder and the decoder, which only eager CPU kernels give; unset DEVICE and COMPILE")
    return h


def set_deterministic(threads: int) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def load_model(path: str, h: tg.Hyperparameters, env) -> tuple[tg.GPT, tg.Hyperparameters]:
    """(model rebuilt from the artifact bytes, eager on the CPU, in eval mode; h with the artifact's recorded model
    settings, as EVAL_ONLY adopts them: an explicit conflicting setting in env is refused)."""
    art = tg.load_artifact(path)
    h = tg.adopt_artifact_config(dataclasses.replace(h, artifact_path=path), art.config, env)
    model = tg.build_model(h)
    model.load_state_dict(art.state, strict=True)
    return model.eval(), h


def check_causal(model: tg.GPT, length: int, vocab: int) -> float:
    """Refuse to code unless logits before position m are bit-identical when only positions >= m change, and a
    repeated forward is bit-identical; returns the seconds of one [1, length] forward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, length), generator=g)
    y, m = x.clone(), length // 2
    y[:, m:] = PAD_TOKEN
    with torch.inference_mode():
        t0 = time.perf_counter()
        a = model(x)
        seconds = time.perf_counter() - t0
        if not bool(torch.isfinite(a).all()):
            raise CompressError("the artifact's logits are not finite (NaN or infinite weights): it is no model to "
                                "code with; use the artifact of a run that finished with a finite score")
        same = torch.equal(a, model(x))
        causal = torch.equal(a[:, :m], model(y)[:, :m])
    if not (same and causal):
        raise toolkit.CheckFailed(f"logits are not reproducible bit for bit on this machine (repeat:{int(same)} "
                                  f"causal:{int(causal)}); decoding could not follow the encoder")
    return seconds


def load_sp(path: str):
    """The decoder's tokenizer: identified by the header's sha256, whatever dataset sits at DATA_PATH."""
    try:
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise CompressError(f"{path}: cannot load the SentencePiece tokenizer ({' '.join(str(e).split())})") from None


def validation_tokens(h: tg.Hyperparameters, k: int) -> torch.Tensor:
    """The first k targets of the validation split (k + 1 tokens), as train_gpt reads the split."""
    tokens = np.concatenate([tg.read_shard(f, h.vocab_size) for f in tg.find_shards(h.data_path, "val")])
    if not 1 <= k <= tokens.size - 1:
        raise CompressError(f"--tokens {k}: the validation split has {tokens.size - 1} targets; pick 1..that")
    return torch.from_numpy(tokens[:k + 1].astype(np.int64))


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"{path}: cannot read UTF-8 text ({e})") from None


def text_tokens(text: str, sp) -> torch.Tensor:
    """Text tokenized as the validation split is: one document per line, each after a BOS token."""
    ids = [t for line in text.split("\n") for t in [sp.bos_id()] + sp.encode(line)]
    if len(ids) < 2:
        raise CompressError("--text: no text to code")
    return torch.tensor(ids, dtype=torch.int64)


def text_of(tokens: torch.Tensor, sp) -> str:
    """Documents (split at BOS tokens) decoded by the tokenizer, one per line."""
    ids = tokens.tolist()
    cuts = [i for i, t in enumerate(ids) if t == sp.bos_id()] + [len(ids)]
    docs = [ids[:cuts[0]]] if cuts[0] > 0 else []
    docs += [ids[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    return "\n".join(sp.decode(d) for d in docs)


# ---------------------------------------------------------------------------------------------------------------
# The evaluator's distributions, one target at a time, for encoder and decoder alike
# ---------------------------------------------------------------------------------------------------------------


class Distributions:
    """Chunks of windows as evaluate() plans them, the logits of one window [1, L], the full fp64 distribution of
    one target, and the after-chunk hooks of the evaluator's pass: the n-gram table update, then the TTT step.
    `tokens` is read in place (the decoder fills it); the TTT step adapts a copy of the model."""

    def __init__(self, model: tg.GPT, h: tg.Hyperparameters, tokens: torch.Tensor, flags: int):
        k, rt = tokens.numel() - 1, tg.single_process_runtime(tokens.device)
        self.model, self.tokens, self.scorer, self.hooks = model, tokens, None, []
        windows = tg.plan_windows(k, h.eval_seq_len, h.eval_stride)
        self.length = int((windows[:, 1] - windows[:, 0]).max())
        if flags & FLAG_NGRAM:
            self.scorer = tg.make_ngram_scorer(tokens, h, rt)  # the evaluator's cache and mixer
            self.hooks.append(self.scorer.after_chunk)
        if flags & FLAG_TTT:
            self.model = copy.deepcopy(model)
            self.hooks.append(tg.ScoreFirstTTT(self.model, self.model, tokens, h, rt).after_chunk)
        chunk = h.ttt_chunk_tokens if flags & FLAG_TTT else h.ngram_chunk_tokens if flags & FLAG_NGRAM else 0
        self.chunks = tg.group_by_chunk(windows, chunk) if chunk else [(1, k + 1, windows)]

    def logits(self, w: Window) -> torch.Tensor:
        """fp32 logits [L, V] of the window (row i predicts target w.start + 1 + i), from one [1, L] forward of the
        input the evaluator's batch has for this window: L tokens from w.start, the last one repeated past the end."""
        at = (w.start + torch.arange(self.length, device=self.tokens.device)).clamp(max=self.tokens.numel() - 2)
        with torch.inference_mode():
            return self.model(self.tokens[at][None])[0]

    def distribution(self, logits: torch.Tensor, w: Window, p: int) -> np.ndarray:
        """Cumulative frequencies of target p from its window's logits (computed on a [1, V] row)."""
        row = logits[p - w.start - 1][None]
        with torch.inference_mode():
            if self.scorer is None:
                dist = torch.softmax(row.double(), dim=-1)
            else:
                dist = self.scorer.full_distribution(row, torch.tensor([p]))
        return frequencies(dist[0])

    def coded(self, logits: torch.Tensor, w: Window, p: int) -> None:
        """Target p is coded (its token known to both sides): the n-gram mixer learns from it as the evaluator's does."""
        if self.scorer is not None:
            with torch.inference_mode():
                self.scorer.observe(logits[p - w.start - 1][None], torch.tensor([p]))

    def after_chunk(self, start: int, end: int) -> None:
        for hook in self.hooks:
            hook(start, end)


def encode_tokens(dists: Distributions) -> bytes:
    enc, tokens = ArithmeticEncoder(), dists.tokens
    for c0, c1, pieces in dists.chunks:
        for w in map(Window._make, pieces.tolist()):
            logits = dists.logits(w)
            for p in range(w.score_from, w.end + 1):
                cum, s = dists.distribution(logits, w, p), int(tokens[p])
                enc.encode(int(cum[s]), int(cum[s + 1]), FREQ_TOTAL)
                dists.coded(logits, w, p)
        dists.after_chunk(c0, c1)
    return enc.finish()


def decode_tokens(dists: Distributions, payload: bytes) -> None:
    """Fill dists.tokens[1:] in place, one forward per target (only tokens before it are known)."""
    dec, tokens = ArithmeticDecoder(payload), dists.tokens
    for c0, c1, pieces in dists.chunks:
        for w in map(Window._make, pieces.tolist()):
            for p in range(w.score_from, w.end + 1):
                logits = dists.logits(w)
                tokens[p] = dec.decode(dists.distribution(logits, w, p))
                dists.coded(logits, w, p)
        dists.after_chunk(c0, c1)


def evaluator_bits(model: tg.GPT, h: tg.Hyperparameters, tokens: torch.Tensor, tables, flags: int):
    """The script's own score of the same targets: its round-trip pass (or its TTT pass with --ttt), 'model' or
    with --ngram 'ngram'; its log lines are kept off the console."""
    rt = tg.single_process_runtime()
    h = dataclasses.replace(h, ngram_enabled=bool(flags & FLAG_NGRAM))
    val = tg.ValData(tokens.clone(), tables)
    with contextlib.redirect_stdout(io.StringIO()):
        results = (tg.ttt_eval if flags & FLAG_TTT else tg.roundtrip_eval)(model, val, h, rt)
    return results["ngram" if flags & FLAG_NGRAM else "model"]


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


class Source(NamedTuple):
    tokens: torch.Tensor  # int64 [K + 1]
    text: str  # what decode must reproduce byte for byte


def read_source(args, h: tg.Hyperparameters, sp) -> Source:
    if args.text:
        text = read_text(args.text)
        return Source(text_tokens(text, sp), text)
    tokens = validation_tokens(h, args.tokens)
    return Source(tokens, text_of(tokens, sp))


def code_flags(args, h: tg.Hyperparameters) -> int:
    if args.ngram and h.ngram_mode != "exact":
        raise CompressError(f"--ngram with NGRAM_MODE={h.ngram_mode}: that rule's 'probabilities' do not sum to 1, "
                            "so they cannot code anything; use NGRAM_MODE=exact")
    return (FLAG_NGRAM if args.ngram else 0) | (FLAG_TTT if args.ttt else 0)


def decoder_setup(hd: Header, name: str, artifact: str, tokenizer: str | None) -> tuple[tg.GPT, tg.Hyperparameters]:
    """(model, settings) exactly as the encoder had them; refuses another platform, artifact or tokenizer."""
    if platform_id() != hd.platform:
        raise CompressError(f"{name} was encoded with {hd.platform}, this is {platform_id()}: the logits would not "
                            "be bit-identical; decode on the same platform")
    if sha256_file(artifact, "artifact") != hd.artifact_sha256:
        raise CompressError(f"{artifact}: sha256 differs from the one {name} was encoded with "
                            f"({hd.artifact_sha256.hex()[:16]}...); pass that artifact")
    set_deterministic(hd.threads)
    env = dict(hd.settings, **({"TOKENIZER_PATH": tokenizer} if tokenizer else {}))
    model, h = load_model(artifact, settings_from(env), env)
    if sha256_file(h.tokenizer_path, "tokenizer; pass it with --tokenizer") != hd.tokenizer_sha256:
        raise CompressError(f"{h.tokenizer_path}: sha256 differs from the tokenizer {name} was encoded with; "
                            "pass that one with --tokenizer")
    return model, h


def decode_file(blob: bytes, name: str, artifact: str, tokenizer: str | None) -> tuple[torch.Tensor, str]:
    """(decoded tokens, their text) from a file's bytes."""
    hd, payload = unpack_file(blob, name)
    model, h = decoder_setup(hd, name, artifact, tokenizer)
    tokens = torch.full((hd.num_targets + 1,), PAD_TOKEN, dtype=torch.int64)
    tokens[0] = hd.first_token
    dists = Distributions(model, h, tokens, hd.flags)
    check_causal(model, dists.length, h.vocab_size)
    decode_tokens(dists, payload)
    if tokens_sha256(tokens) != hd.tokens_sha256:
        raise toolkit.CheckFailed(f"{name}: decoded tokens differ from the encoded ones (sha256): the distributions "
                                  "were not reproduced bit for bit")
    return tokens, text_of(tokens, load_sp(h.tokenizer_path))


def report(claimed, payload_bytes: int, header_bytes: int, identical: bool, times: dict) -> dict:
    """Claimed bits (the evaluator's sum) vs the coded payload and the whole file, per token and per byte."""
    claimed_bits = claimed.loss * claimed.tokens / math.log(2.0)
    payload_bits, file_bits = 8 * payload_bytes, 8 * (payload_bytes + header_bytes)
    return dict(targets=claimed.tokens, bytes=claimed.bytes, claimed_bits=claimed_bits, claimed_bpb=claimed.bpb,
                payload_bits=payload_bits, payload_bpb=payload_bits / claimed.bytes,
                file_bits=file_bits, file_bpb=file_bits / claimed.bytes, header_bytes=header_bytes,
                overhead_bits_per_token=(payload_bits - claimed_bits) / claimed.tokens,
                overhead_relative=payload_bits / claimed_bits - 1.0, decoded_identical=identical, **times)


def encode_command(args, env) -> dict:
    h = settings_from(env)
    flags = code_flags(args, h)
    threads = args.threads
    for flag, path in (("-o", args.output), ("--json", args.json)):
        toolkit.refuse_overwrite(path, (args.artifact, args.text, h.tokenizer_path), flag)
    set_deterministic(threads)
    model, h = load_model(args.artifact, h, env)
    sp = tg.load_tokenizer(h)  # also checked against the dataset's manifest
    source = read_source(args, h, sp)
    tables = tg.build_byte_luts(sp, h.vocab_size)
    if int(tg.count_bytes(source.tokens[:-1], source.tokens[1:], tables).sum()) == 0:  # bpb would divide by 0
        raise CompressError(f"{'--text ' + args.text if args.text else f'--tokens {args.tokens}'}: its "
                            f"{source.tokens.numel() - 1} targets hold no byte of text (only blank lines or "
                            "document starts); nothing to code")
    dists = Distributions(model, h, source.tokens.clone(), flags)
    forward_s = check_causal(model, dists.length, h.vocab_size)
    t0 = time.perf_counter()
    payload = encode_tokens(dists)
    encode_s = time.perf_counter() - t0
    hd = Header(flags, source.tokens.numel() - 1, int(source.tokens[0]), threads,
                sha256_file(args.artifact, "artifact"), sha256_file(h.tokenizer_path, "tokenizer"),
                tokens_sha256(source.tokens), coded_settings(h), platform_id())
    blob = pack_file(hd, payload)
    write_output(args.output, blob)
    times = dict(encode_s=encode_s, forward_s=forward_s, decode_estimate_s=forward_s * hd.num_targets)
    identical = None
    if args.verify:
        t0 = time.perf_counter()
        identical = decode_file(Path(args.output).read_bytes(), args.output, args.artifact, None)[1] == source.text
        times["decode_s"] = time.perf_counter() - t0
    claimed = evaluator_bits(model, h, source.tokens, tables, flags)
    return report(claimed, len(payload), len(blob) - len(payload), identical, times)


def decode_command(args, env) -> dict:
    for flag, path in (("-o", args.output), ("--json", args.json)):
        toolkit.refuse_overwrite(path, (args.input, args.artifact, args.tokenizer), flag)
    try:
        blob = Path(args.input).read_bytes()
    except OSError as e:
        raise CompressError(f"{args.input}: cannot read ({e.strerror})") from None
    t0 = time.perf_counter()
    tokens, text = decode_file(blob, args.input, args.artifact, args.tokenizer or env.get("TOKENIZER_PATH"))
    write_output(args.output, text.encode("utf-8"))
    return dict(targets=tokens.numel() - 1, text_bytes=len(text.encode("utf-8")), decode_s=time.perf_counter() - t0)


def format_report(event: str, r: dict) -> str:
    def fmt(v):
        if v is None or isinstance(v, bool):
            return "na" if v is None else str(int(v))
        return f"{v:.6f}" if isinstance(v, float) else str(v)
    return f"{event} " + " ".join(f"{k}:{fmt(v)}" for k, v in r.items())


def parse_args(argv):
    ap = toolkit.ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="code K validation targets (or a text file) into OUT")
    enc.add_argument("--artifact", required=True)
    src = enc.add_mutually_exclusive_group()
    src.add_argument("--tokens", type=toolkit.positive_int, default=DEFAULT_TOKENS,
                     help=f"the first K targets of the val split (default {DEFAULT_TOKENS})")
    src.add_argument("--text", help="a UTF-8 text file (one document per line) instead of the val split")
    enc.add_argument("--ngram", action="store_true", help="the exact n-gram mixture (as ngram_eval)")
    enc.add_argument("--ttt", action="store_true", help="legal score-first TTT (as the TTT_ENABLED=1 pass, TTT_* settings)")
    enc.add_argument("--threads", type=toolkit.positive_int, default=1, help="CPU threads for encode and decode "
                     "(default 1: decoding runs many small forwards, fastest on one thread)")
    enc.add_argument("--no-verify", dest="verify", action="store_false", help="skip decoding the file back")
    enc.add_argument("-o", "--output", required=True)
    dec = sub.add_parser("decode", help="decode IN back to text")
    dec.add_argument("--artifact", required=True)
    dec.add_argument("--tokenizer", help="SentencePiece model (default: TOKENIZER_PATH, else the header's path)")
    dec.add_argument("input")
    dec.add_argument("-o", "--output", required=True)
    for p in (enc, dec):
        p.add_argument("--json", help="also write the report as JSON to PATH (- for stdout)")
    return ap.parse_args(argv)


@toolkit.entry(tg.UserError)
def main(argv=None, env=None) -> int:
    args = parse_args(argv)
    env = os.environ if env is None else env
    r = encode_command(args, env) if args.command == "encode" else decode_command(args, env)
    emit(format_report(f"compress_{args.command}", r), r, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
