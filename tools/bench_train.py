"""Benchmark training throughput of train_gpt.py: ms/step, tokens/s, model FLOPs per token and MFU.

  python3 tools/bench_train.py                                   # default (record) configuration, DATA_PATH shards
  NUM_LAYERS=2 MODEL_DIM=64 python3 tools/bench_train.py --synthetic --steps 3 --warmup 1 --json -
  torchrun --standalone --nproc_per_node=8 tools/bench_train.py --steps 20 --json bench.json

The configuration comes from the environment exactly as for train_gpt.py (Hyperparameters.from_env). The tool builds
the model and optimizers, runs --warmup untimed steps (torch.compile happens here), then --steps timed steps with
synchronize() before and after; only training steps are inside the clock (no validation, no export), each one as
train() runs it: train_step, then finish_step (EMA update, the next batch prefetched, the step's one blocking status
sync). --synthetic draws uniform random tokens in memory instead of reading DATA_PATH shards. Only rank 0 prints.

FLOPs per token (training = forward + backward, 3 × the forward's 2 FLOPs per multiply-add):

  flops_per_token = 6·N + 6·L·T·d

  N = L·(2·d² + 2·d·kv_dim + 2·d·mlp_hidden + d·H·[gated attention]) + d·bigram_dim·[bigram] + V·d

N counts the weights of every matrix multiply a token goes through: per layer W_q, W_o (d×d), W_k, W_v (kv_dim×d),
MLP up/down (mlp_hidden×d), the attention gate (H×d) when GATED_ATTENTION_ENABLED; the BigramHash projection; and the
tied output head (V×d). Embedding lookups (tok_emb as input, the bigram table) are not matrix multiplies and are
excluded. The attention term: per layer, QKᵀ and AV cost 2·T·d multiply-adds per token for full attention; causal
masking halves that to T·d multiply-adds = 2·T·d FLOPs forward, ×3 for forward+backward = 6·T·d (GQA does not change
it: the query side has H·head_dim = d). T = TRAIN_SEQ_LEN, d = MODEL_DIM, L = NUM_LAYERS, H = NUM_HEADS, V = VOCAB_SIZE.
Elementwise work (norms, RoPE, XSA, gates, softcap, optimizer incl. Newton-Schulz) is not counted.

MFU = flops_per_token × tokens/s per device / peak, with peak the dense bf16 FLOP/s of the device (table below, by
CUDA device name) or --peak-flops. On CPU, or on an unknown GPU without --peak-flops, mfu is null.

The rig (build_rig) and the timed measurement (time_training) are shared with tools/preflight.py, which reports the
same figures for QAT off and on; compile_s = warm-up time minus the warm-up steps at the measured rate.

A bad setting, path or argument (--steps 0, --peak-flops that is not a finite number > 0) is one `error:` line and
exit 2 (tools/toolkit.py).
"""
import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402

# Dense bf16 tensor-core peak FLOP/s by (substring of) CUDA device name; first match wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def matmul_params(h: tg.Hyperparameters) -> int:
    """N of the docstring: weights of the matrix multiplies per token (tied head included, lookups excluded)."""
    d = h.model_dim
    per_layer = 2 * d * d + 2 * d * h.kv_dim + 2 * d * h.mlp_hidden
    if h.gated_attention_enabled:
        per_layer += d * h.num_heads
    n = h.num_layers * per_layer + h.vocab_size * d
    if h.bigram_vocab_size > 0:
        n += h.bigram_dim * d
    return n


def flops_per_token(h: tg.Hyperparameters) -> int:
    """6·N + 6·L·T·d (training FLOPs per token, causal attention)."""
    return 6 * matmul_params(h) + 6 * h.num_layers * h.train_seq_len * h.model_dim


def peak_flops_for(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class SyntheticTokenStream:
    """Uniform random tokens in memory, the same stream on every rank (as the shards are): `take(n)` like theirs."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab, self.gen = vocab_size, torch.Generator().manual_seed(seed)

    def take(self, n: int) -> np.ndarray:
        return torch.randint(0, self.vocab, (n,), generator=self.gen, dtype=torch.int32).numpy()


class SyntheticTokenLoader(tg.DistributedTokenLoader):
    """DistributedTokenLoader (same batches, rank spans, copies and prefetch) on a SyntheticTokenStream."""

    def __init__(self, rt: tg.Runtime, vocab_size: int, seed: int = 0):
        self.stream, self.rt, self.pending = SyntheticTokenStream(vocab_size, seed), rt, None


def reset_peak_memory(rt: tg.Runtime) -> None:
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)


def parse_args(argv=None) -> argparse.Namespace:
    p = toolkit.ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=toolkit.positive_int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=toolkit.non_negative_int, default=5,
                   help="untimed steps before the clock, compile included (default 5)")
    p.add_argument("--synthetic", action="store_true", help="random tokens in memory instead of DATA_PATH shards")
    p.add_argument("--qat", action="store_true", help="benchmark the late-QAT graph (int6 fake-quant on)")
    p.add_argument("--peak-flops", type=toolkit.positive_float, default=None,
                   help="peak FLOP/s per device for MFU (overrides table)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON to PATH ('-' = stdout)")
    return p.parse_args(argv)


class TrainingRig(NamedTuple):
    """What a timed training measurement drives: the model (raw and as run), its optimizers, a token loader and the
    EMA train() keeps (None with EMA_ENABLED=0)."""
    base_model: torch.nn.Module
    model: torch.nn.Module
    opt: object  # build_optimizers' bundle
    loader: object
    ema: tg.EMA | None


def build_rig(h: tg.Hyperparameters, rt: tg.Runtime, synthetic: bool) -> TrainingRig:
    """The training script's own model (on the runtime's device and attention backend), compile wrapper,
    optimizers, EMA and loader (or synthetic tokens)."""
    torch.manual_seed(h.seed)
    base_model = tg.build_model(h, rt)
    model = tg.compile_model(base_model, rt.use_compile)
    opt = tg.build_optimizers(base_model, h, rt)
    if synthetic:
        loader = SyntheticTokenLoader(rt, h.vocab_size, h.seed)
    else:
        loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    return TrainingRig(base_model, model, opt, loader, tg.EMA(base_model, h.ema_decay) if h.ema_enabled else None)


def _timed_steps(rig: TrainingRig, h: tg.Hyperparameters, rt: tg.Runtime, first: int, count: int):
    """(seconds, last loss) of `count` training steps as train() runs them (train_step, then finish_step: EMA,
    prefetch, the status sync) between synchronize()s (a barrier first on many ranks)."""
    if rt.distributed:
        torch.distributed.barrier()
    tg.synchronize(rt)
    t0 = time.perf_counter()
    loss = None
    for i in range(count):
        loss = tg.train_step(rig.model, rig.opt, rig.loader, h, rt, first + i, 1.0)
        tg.finish_step(loss, h, rt, base_model=rig.base_model, ema=rig.ema, loader=rig.loader)
    tg.synchronize(rt)
    return time.perf_counter() - t0, loss


def time_training(rig: TrainingRig, h: tg.Hyperparameters, rt: tg.Runtime, warmup: int, steps: int,
                  peak: float | None) -> dict:
    """Throughput of the rig in its current QAT state: `warmup` untimed steps (compilation happens there), then
    `steps` timed ones. compile_s = warm-up time minus what those steps cost at the measured rate."""
    warmup_s, _ = _timed_steps(rig, h, rt, 0, warmup)
    reset_peak_memory(rt)
    elapsed, loss = _timed_steps(rig, h, rt, warmup, steps)
    ms_per_step = 1000.0 * elapsed / steps
    tokens_per_step = h.grad_accum_steps(rt.world_size) * h.micro_batch_tokens(rt.world_size) * rt.world_size
    per_device = tokens_per_step * steps / elapsed / rt.world_size
    achieved = flops_per_token(h) * per_device
    return {
        "qat": bool(rig.base_model.qat_active), "warmup_steps": warmup, "timed_steps": steps,
        "warmup_s": warmup_s, "compile_s": max(0.0, warmup_s - warmup * ms_per_step / 1000.0),
        "tokens_per_step": tokens_per_step, "ms_per_step": ms_per_step,
        "tokens_per_s": per_device * rt.world_size, "tokens_per_s_per_device": per_device,
        "achieved_flops_per_device": achieved, "peak_flops": peak, "mfu": achieved / peak if peak else None,
        "final_loss": float(loss.item()), **toolkit.peak_memory_mib(rt.device),
    }


def run(args: argparse.Namespace, h: tg.Hyperparameters, rt: tg.Runtime) -> dict:
    rt = tg.with_attention(rt, h)
    rig = build_rig(h, rt, args.synthetic)
    rig.base_model.qat_active = args.qat
    figures = time_training(rig, h, rt, args.warmup, args.steps, peak_flops_for(rt.device, args.peak_flops))
    return {
        "device": torch.cuda.get_device_name(rt.device) if rt.is_cuda else "cpu",
        "device_type": rt.device.type,
        "world_size": rt.world_size,
        "torch": torch.__version__,
        "attention": rt.attention.name,
        "compile": rt.use_compile,
        "data": "synthetic" if args.synthetic else h.data_path,
        "grad_accum_steps": h.grad_accum_steps(rt.world_size),
        "seq_len": h.train_seq_len,
        "model_params": sum(p.numel() for p in rig.base_model.parameters()),
        "matmul_params": matmul_params(h),
        "flops_per_token": flops_per_token(h),
        "flops_formula": "6*N + 6*L*T*d",
        **figures,
    }


def report(res: dict) -> str:
    mfu = "null" if res["mfu"] is None else f"{100 * res['mfu']:.2f}%"
    mem = " ".join(f"{k}:{v:.0f}" for k, v in res.items() if k.startswith("peak_memory"))
    return (f"device:{res['device']} world_size:{res['world_size']} torch:{res['torch']} "
            f"attention:{res['attention']} compile:{int(res['compile'])} qat:{int(res['qat'])} data:{res['data']}\n"
            f"steps:{res['timed_steps']} (warmup {res['warmup_steps']}: {res['warmup_s']:.1f}s, compile "
            f"~{res['compile_s']:.1f}s) tokens/step:{res['tokens_per_step']} ms/step:{res['ms_per_step']:.2f} "
            f"tokens/s:{res['tokens_per_s']:.0f} tokens/s/device:{res['tokens_per_s_per_device']:.0f}\n"
            f"flops/token:{res['flops_per_token']:.4g} (6N+6LTd, N={res['matmul_params']}) "
            f"achieved:{res['achieved_flops_per_device'] / 1e12:.3f} TFLOP/s/device mfu:{mfu} {mem} "
            f"final_loss:{res['final_loss']:.4f}")


@toolkit.entry(tg.UserError)
def measure(argv=None) -> int:
    """Parse, check, run and report (rank 0); returns the exit code."""
    args = parse_args(argv)
    toolkit.check_writable(args.json)
    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.init_runtime(h)
    h.validate(rt.world_size)
    res = run(args, h, rt)
    if rt.is_main:
        logparse.emit(report(res), res, args.json)
    return toolkit.EXIT_OK


def main(argv=None) -> int:
    tg.shutdown(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
