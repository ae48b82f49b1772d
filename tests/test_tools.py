"""Tests of tools/ (log parser, summary, significance test, plots, record folder) on synthetic logs."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import logparse  # noqa: E402
import make_record  # noqa: E402
import plot_logs  # noqa: E402
import significance  # noqa: E402
import summarize_logs  # noqa: E402

# per-seed figures (SPEC 9.2-like): steps, step_avg, EMA bpb, round-trip loss/bpb, n-gram loss/bpb, total bytes
SEEDS = {
    1337: dict(steps=6774, avg=88.58, ema=1.1193, rt_loss=1.90443578, rt_bpb=1.12791767, ng_loss=0.47961142,
               ng_bpb=0.28405290, total=15854191),
    42: dict(steps=6772, avg=88.60, ema=1.1194, rt_loss=1.90393001, rt_bpb=1.12761002, ng_loss=0.47950011,
             ng_bpb=0.28399001, total=15924715),
    2024: dict(steps=6769, avg=88.70, ema=1.1191, rt_loss=1.90450123, rt_bpb=1.12795511, ng_loss=0.47955555,
               ng_bpb=0.28402222, total=15880000),
}
SOURCE_NOISE = [
    '"""Parameter Golf: 11-layer GQA transformer."""',
    "    log0(f\"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}\")",
    "    log0(f\"final_int6_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\")",
    "  final_int6_zstd_roundtrip_exact val_loss:… val_bpb:…   sliding-window score",
    "        return [f\"hparam {f.name}:{format_setting(getattr(self, f.name))}\"",
    "Total submission int6+zstd: {total} bytes",
    "=" * 100,
]
SHA_OF_SCRIPT = "ab" * 32


def log_text(seed, sha=SHA_OF_SCRIPT, code_bytes=93397, hashed=False, truncate_at=None, extra_hparams=None):
    """Realistic rank-0 log text of one seed, with source-code noise lines between header and training."""
    s = SEEDS[seed]
    hp = {"iterations": "20000", "max_wallclock_seconds": "600.0", "ngram_mode": "hashed" if hashed else "exact",
          "run_id": f"run{seed}", "seed": str(seed), "train_batch_tokens": "786432", "val_max_tokens": "0",
          "ngram_max_order": "9", "diag_eval_candidates": "1"}
    hp.update(extra_hparams or {})
    lines = [f"logs/run{seed}.txt"] + [f"hparam {k}:{v}" for k, v in sorted(hp.items())]
    lines += [f"code_bytes:{code_bytes} code_sha256:{sha}",
              "runtime device:cuda world_size:8 grad_accum_steps:1 attention:fa3 compile:1 torch:2.9.1",
              "model_params:26744007",
              "val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/*_val_*.bin tokens:62021632 bytes:151080633"]
    lines += SOURCE_NOISE
    lines += [f"warmup_step:{i}/20" for i in range(1, 21)]
    lines.append(f"step:0/20000 val_loss:6.9300 val_bpb:4.1043 train_time:0ms step_avg:0.02ms")
    wiggle = (seed % 7) / 1000  # seeds differ a little
    train = [(1, 6.9312), (2, 8.6531)] + [(k, 7.5 - k * 0.4 + wiggle) for k in range(3, 11)]
    train += [(k, 2.3584 - (k / 6774) ** 0.5 * 0.3 + wiggle * (k % 1000 == 0)) for k in range(500, s["steps"], 500)]
    train += [(s["steps"], 2.0668 - wiggle)]
    for step, loss in train:
        t = step * s["avg"] if step > 10 else step * 88.84
        lines.append(f"step:{step}/20000 train_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{t / step:.2f}ms")
        if step == 4000:
            lines.append(f"step:4000/20000 val_loss:2.0118 val_bpb:1.1915 train_time:{t:.0f}ms step_avg:{s['avg']:.2f}ms")
        if step == 5500:
            lines.append("step:5757 QAT activated (time_frac=0.850, scale=0.2900)")
        if step == 6000:
            lines.append("swa:start step:6100")
    final_t = s["steps"] * s["avg"]
    lines += [f"step:{s['steps']}/20000 val_loss:1.8914 val_bpb:{1.1202 + wiggle:.4f} train_time:{final_t:.0f}ms step_avg:{s['avg']:.2f}ms",
              f"stopping_early: wallclock_cap train_time:{final_t:.0f}ms step:{s['steps']}/20000",
              "peak memory allocated: 22669 MiB reserved: 22812 MiB",
              f"diag_eval_ema val_loss:1.8900 val_bpb:{s['ema']:.4f} eval_time:70712ms",
              "diag_eval_swa val_loss:1.8940 val_bpb:1.1218 eval_time:70715ms",
              "export_weights:ema",
              f"Serialized model int6+zstd: {s['total'] - code_bytes} bytes (payload:27627290 raw_torch:27693135 payload_ratio:3.82x)",
              f"Total submission int6+zstd: {s['total']} bytes",
              f"artifact path:final_model.int6.ptz sha256:{'c' * 64} model_bytes:{s['total'] - code_bytes} "
              f"code_bytes:{code_bytes} total_bytes:{s['total']} limit:16000000",
              f"final_int6_zstd_roundtrip val_loss:{s['rt_loss']:.4f} val_bpb:{s['rt_bpb']:.4f} eval_time:86810ms",
              f"final_int6_zstd_roundtrip_exact val_loss:{s['rt_loss']:.8f} val_bpb:{s['rt_bpb']:.8f}",
              f"final_int8_zlib_roundtrip_exact val_loss:{s['rt_loss']:.8f} val_bpb:{s['rt_bpb']:.8f}",
              f"Starting N-gram eval: order 2-9 mode={'hashed' if hashed else 'exact'} chunk=65536"]
    lines += [f"ngram_chunk [{k}/947] running_bpb:{1.2 - k / 1000:.6f} elapsed:{k * 0.44:.1f}s" for k in range(0, 947, 20)]
    if hashed:
        lines += [f"ngram_hashed_unnormalized val_loss:{s['ng_loss']:.4f} val_bpb:{s['ng_bpb']:.4f} eval_time:416328ms",
                  f"ngram_hashed_unnormalized_exact val_loss:{s['ng_loss']:.8f} val_bpb:{s['ng_bpb']:.8f}"]
    else:
        lines += ["ngram_audit positions:256 sum_min:0.999999998 sum_median:1.000000000 sum_max:1.000000003",
                  f"ngram_eval val_loss:{s['ng_loss']:.4f} val_bpb:{s['ng_bpb']:.4f} eval_time:416328ms",
                  f"ngram_eval_exact val_loss:{s['ng_loss']:.8f} val_bpb:{s['ng_bpb']:.8f}"]
    lines.append("post_training_time:590123ms")
    if truncate_at is not None:
        lines = lines[:next(i for i, ln in enumerate(lines) if ln.startswith(truncate_at))]
    return "\n".join(lines) + "\n"


def write_logs(tmp_path, seeds=(1337, 42, 2024), **kw):
    """Write one log per seed into tmp_path/logs and return their paths."""
    d = tmp_path / "logs"
    d.mkdir(exist_ok=True)
    paths = []
    for seed in seeds:
        p = d / f"run{seed}.txt"
        p.write_text(log_text(seed, **kw))
        paths.append(p)
    return paths
