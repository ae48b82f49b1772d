"""tools/bench_train.py on CPU: a tiny configuration, synthetic tokens and real shards, JSON figures checked."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import RT1, TINY_RUN, TINY_SHAPE, tiny_env, tiny_hparams

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_train.py"
VOCAB = 320  # the tiny corpus's


def expected_flops_per_token():
    """6·N + 6·L·T·d written out for the tiny configuration (gated attention and bigram on by default)."""
    L, d, H, kv_heads = (TINY_SHAPE[k] for k in ("num_layers", "model_dim", "num_heads", "num_kv_heads"))
    V, T, bigram_dim = VOCAB, TINY_RUN["train_seq_len"], TINY_SHAPE["bigram_dim"]
    kv_dim, hidden = kv_heads * (d // H), 3 * d
    n = L * (2 * d * d + 2 * d * kv_dim + 2 * d * hidden + d * H) + bigram_dim * d + V * d
    return 6 * n + 6 * L * T * d


def run_bench(tmp_path, *args, **env_extra):
    env = tiny_env(VOCAB_SIZE=str(VOCAB), TOKENIZER_PATH=str(tmp_path / "unused.model"), **env_extra)
    proc = subprocess.run([sys.executable, str(TOOL), "--steps", "3", "--warmup", "1", "--json", "-", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ms/step" in proc.stderr  # human-readable report goes to stderr when the JSON takes stdout
    return json.loads(proc.stdout)


def check_common(res):
    assert res["ms_per_step"] > 0 and res["tokens_per_s"] > 0
    assert res["tokens_per_s_per_device"] == res["tokens_per_s"] and res["world_size"] == 1
    assert res["tokens_per_step"] == 1024 and res["timed_steps"] == 3 and res["warmup_steps"] == 1
    assert res["flops_per_token"] == expected_flops_per_token()
    assert res["mfu"] is None and res["peak_flops"] is None
    assert res["device"] == "cpu" and res["compile"] is False and res["attention"] == "sdpa"
    assert res["peak_memory_rss_mib"] > 0 and res["torch"]


def test_bench_train_synthetic(tmp_path):
    res = run_bench(tmp_path, "--synthetic", DATA_PATH=str(tmp_path / "no_such_dir"))
    check_common(res)
    assert res["data"] == "synthetic"


def test_bench_train_shards_and_peak_override(tmp_path, tiny_corpus):
    data_path, _, _ = tiny_corpus
    res = run_bench(tmp_path, "--peak-flops", "1e12", DATA_PATH=data_path)
    assert res["data"] == data_path
    res_no_mfu = dict(res, mfu=None, peak_flops=None)
    check_common(res_no_mfu)
    assert res["peak_flops"] == 1e12
    assert abs(res["mfu"] - res["flops_per_token"] * res["tokens_per_s_per_device"] / 1e12) < 1e-12


def test_timed_steps_are_the_steps_train_runs(monkeypatch):
    """Each warm-up and timed step is train()'s step: train_step, then finish_step (EMA update, the next batch
    prefetched, the blocking status sync), so the figures include the per-step sync and EMA."""
    import bench_train
    import train_gpt as tg
    h = tiny_hparams(vocab_size=VOCAB, **TINY_RUN)
    rig = bench_train.build_rig(h, RT1, synthetic=True)
    assert rig.ema is not None and isinstance(rig.loader, tg.DistributedTokenLoader)
    calls, real_finish, real_sync = [], tg.finish_step, tg.reduce_step_status
    monkeypatch.setattr(tg, "finish_step", lambda *a, **k: calls.append("finish") or real_finish(*a, **k))
    monkeypatch.setattr(tg, "reduce_step_status", lambda *a: calls.append("sync") or real_sync(*a))
    shadow = [t.clone() for t in rig.ema.shadow]
    res = bench_train.time_training(rig, h, RT1, warmup=1, steps=2, peak=None)
    assert calls == ["finish", "sync"] * 3 and res["timed_steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(shadow, rig.ema.shadow))  # the EMA was updated
