"""tools/bench_train.py on CPU: a tiny configuration, synthetic tokens and real shards, JSON figures checked. The
tool runs in-process through its main(argv) with the environment a command line would have; its command line itself
runs under torchrun on two ranks in the full tier."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, RT1, TINY_RUN, TINY_SHAPE, main_in_process, tiny_env, tiny_hparams

import bench_train  # tools/ is on sys.path (conftest)

VOCAB = 320  # the tiny corpus's


def expected_flops_per_token():
    """6·N + 6·L·T·d written out for the tiny configuration (gated attention and bigram on by default)."""
    L, d, H, kv_heads = (TINY_SHAPE[k] for k in ("num_layers", "model_dim", "num_heads", "num_kv_heads"))
    V, T, bigram_dim = VOCAB, TINY_RUN["train_seq_len"], TINY_SHAPE["bigram_dim"]
    kv_dim, hidden = kv_heads * (d // H), 3 * d
    n = L * (2 * d * d + 2 * d * kv_dim + 2 * d * hidden + d * H) + bigram_dim * d + V * d
    return 6 * n + 6 * L * T * d


def run_bench(tmp_path, monkeypatch, capsys, *args, **env_extra):
    env = tiny_env(VOCAB_SIZE=str(VOCAB), TOKENIZER_PATH=str(tmp_path / "unused.model"), **env_extra)
    argv = ["--steps", "3", "--warmup", "1", "--json", "-", *args]
    assert main_in_process(env, monkeypatch, tmp_path, bench_train.main, argv) == 0
    out, err = capsys.readouterr()
    assert "ms/step" in err  # human-readable report goes to stderr when the JSON takes stdout
    return json.loads(out)


def check_common(res):
    assert res["ms_per_step"] > 0 and res["tokens_per_s"] > 0
    assert res["tokens_per_s_per_device"] == res["tokens_per_s"] and res["world_size"] == 1
    assert res["tokens_per_step"] == 1024 and res["timed_steps"] == 3 and res["warmup_steps"] == 1
    assert res["flops_per_token"] == expected_flops_per_token()
    assert res["mfu"] is None and res["peak_flops"] is None
    assert res["device"] == "cpu" and res["compile"] is False and res["attention"] == "sdpa"
    assert res["peak_memory_rss_mib"] > 0 and res["torch"]


def test_bench_train_synthetic(tmp_path, monkeypatch, capsys, one_thread):
    res = run_bench(tmp_path, monkeypatch, capsys, "--synthetic", DATA_PATH=str(tmp_path / "no_such_dir"))
    check_common(res)
    assert res["data"] == "synthetic"


def test_bench_train_shards_and_peak_override(tmp_path, tiny_corpus, monkeypatch, capsys, one_thread):
    data_path, _, _ = tiny_corpus
    res = run_bench(tmp_path, monkeypatch, capsys, "--peak-flops", "1e12", DATA_PATH=data_path)
    assert res["data"] == data_path
    res_no_mfu = dict(res, mfu=None, peak_flops=None)
    check_common(res_no_mfu)
    assert res["peak_flops"] == 1e12
    assert abs(res["mfu"] - res["flops_per_token"] * res["tokens_per_s_per_device"] / 1e12) < 1e-12


@pytest.mark.slow  # torchrun
def test_two_ranks_under_torchrun(tmp_path):
    """The command line as README shows it, on 2 gloo ranks: the global batch is split over them, only rank 0
    reports, and tokens/s counts both devices."""
    env = tiny_env(VOCAB_SIZE=str(VOCAB), TOKENIZER_PATH=str(tmp_path / "unused.model"), TRAIN_MICRO_BATCH_TOKENS="0")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tools" / "bench_train.py"), "--synthetic", "--steps", "2", "--warmup", "1",
                           "--json", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["tokens_per_step"] == TINY_RUN["train_batch_tokens"]
    assert res["tokens_per_s"] == pytest.approx(2 * res["tokens_per_s_per_device"])
    assert proc.stdout.count("ms/step:") == 1  # rank 0 only


def test_timed_steps_are_the_steps_train_runs(monkeypatch, one_thread):
    """Each warm-up and timed step is train()'s step: train_step, then finish_step (EMA update, the next batch
    prefetched, the step's blocking status sync), so the figures include the per-step sync and EMA."""
    import train_gpt as tg
    h = tiny_hparams(vocab_size=VOCAB, **TINY_RUN)
    rig = bench_train.build_rig(h, RT1, synthetic=True)
    assert rig.ema is not None and isinstance(rig.loader, tg.DistributedTokenLoader)
    calls, real_step, real_finish = [], tg.train_step, tg.finish_step
    monkeypatch.setattr(tg, "train_step", lambda *a, **k: calls.append("step") or real_step(*a, **k))

    def finish(*a, **k):
        calls.append("finish")
        statuses.append(real_finish(*a, **k))
        return statuses[-1]
    statuses = []
    monkeypatch.setattr(tg, "finish_step", finish)
    shadow = [t.clone() for t in rig.ema.shadow]
    res = bench_train.time_training(rig, h, RT1, warmup=1, steps=2, peak=None)
    assert calls == ["step", "finish"] * 3 and res["timed_steps"] == 2
    assert [(s.stop, s.nonfinite) for s in statuses] == [(False, False)] * 3  # each step's status sync ran
    assert any(not torch.equal(a, b) for a, b in zip(shadow, rig.ema.shadow))  # the EMA was updated
    assert rig.loader.pending is not None  # finish_step prefetched the next batch


def test_synthetic_tokens_are_split_across_ranks_like_shards():
    """Two ranks of the synthetic loader read one stream, each its own span of world × (micro-batch + 1) tokens, as
    DistributedTokenLoader does with shards: rank 1's inputs start where rank 0's span ends."""
    import train_gpt as tg
    loaders = [bench_train.SyntheticTokenLoader(tg.Runtime(r, 2, r, torch.device("cpu"), True), VOCAB, seed=3)
               for r in range(2)]
    stream = bench_train.SyntheticTokenStream(VOCAB, seed=3).take(2 * 65)
    for rank, loader in enumerate(loaders):
        x, y = loader.next_batch(64, 16)
        mine = stream[rank * 65:(rank + 1) * 65]
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert np.array_equal(x.reshape(-1).numpy(), mine[:-1]) and np.array_equal(y.reshape(-1).numpy(), mine[1:])
    many = bench_train.SyntheticTokenStream(VOCAB, seed=3).take(20_000)  # uniform: every id, none outside
    assert np.array_equal(np.unique(many), np.arange(VOCAB))
