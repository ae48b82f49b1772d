"""Training loop pieces: the compile warm-up is undone exactly; one train step lowers the loss.
Run: python3 -m pytest tests/test_training.py"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, RT1, main_in_process, tiny_model, tiny_run_env


def setup(tiny, tiny_corpus, **overrides):
    data, tok, vocab = tiny_corpus
    h = tiny(data_path=data, tokenizer_path=tok, vocab_size=vocab, **overrides)
    model = tiny_model(h)
    return h, RT1, model, tg.build_optimizers(model, h, RT1)


def test_the_warmup_is_undone_exactly_and_the_last_validation_changes_nothing(tiny_corpus, tmp_path, monkeypatch):
    """WARMUP_STEPS real steps (QAT on in the last) are then undone: model, optimizer state and data order restart as
    if they never ran, so a run with warm-up trains the same weights, bit for bit, as one without. The second run
    also validates after the last step (VAL_LAST_STEP=1; the default 0 does not), which changes nothing either."""
    runs = {}
    for warmup in ("0", "3"):
        env = tiny_run_env(tiny_corpus, tmp_path / warmup, WARMUP_STEPS=warmup, ITERATIONS="4", VAL_LOSS_EVERY="0",
                           NGRAM_ENABLED="0", TRAIN_LOG_EVERY="1", VAL_LAST_STEP=str(int(warmup == "3")))
        (tmp_path / warmup).mkdir()
        assert main_in_process(env, monkeypatch) == 0
        log = (tmp_path / warmup / "logs" / "e2e.txt").read_text()
        runs[warmup] = (Path(env["ARTIFACT_PATH"]).read_bytes(), re.findall(r"^step:\d+/4 train_loss:\S+", log, re.M),
                        re.findall(r"^warmup_step:\S+", log, re.M), re.findall(r"^step:\d+/4 val_loss:", log, re.M))
    assert runs["0"][2] == [] and runs["3"][2] == ["warmup_step:1/3", "warmup_step:2/3", "warmup_step:3/3"]
    assert len(runs["0"][1]) == 4 and runs["3"][1] == runs["0"][1]
    assert runs["3"][0] == runs["0"][0]
    assert runs["0"][3] == [] and runs["3"][3] == ["step:4/4 val_loss:"]


def test_train_steps_lower_the_loss(tiny, tiny_corpus):
    h, rt, model, opt = setup(tiny, tiny_corpus)
    loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    losses = [float(tg.train_step(model, opt, loader, h, rt, i, 1.0)) for i in range(12)]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.slow
def test_ranks_with_skewed_clocks_share_lr_qat_and_stop_step(tiny_corpus, tmp_path):
    """Rank 1's clock runs 3.7x faster: the MAX-reduced elapsed time drives LR, QAT and the stop on both ranks."""
    data, _, vocab = tiny_corpus
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "train_dist_worker.py"), data, str(vocab), str(tmp_path / "rank")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    qat_steps = [s["step"] for s in r0["seen"] if s["qat"]]
    assert 0 < qat_steps[0] < r0["steps"] - 1 and qat_steps == list(range(qat_steps[0], r0["steps"]))
    assert min(s["scale"] for s in r0["seen"]) < 1.0  # warm-down reached: the scale depends on the shared clock
    assert r0["steps"] < 60  # stopped by rank 1's (faster) clock, before rank 0 alone would have


def test_train_validates_periodically_but_leaves_the_last_validation_to_after_the_clock(tiny, tiny_corpus,
                                                                                         monkeypatch, capsys):
    h, rt, model, opt = setup(tiny, tiny_corpus, val_loss_every=3, iterations=6, val_last_step=True)
    calls = []
    monkeypatch.setattr(tg, "sliding_eval", lambda *args: calls.append(args) or SimpleNamespace(loss=1.0, bpb=2.0))
    result = tg.train(model, model, opt, None, h, rt)
    assert result.steps == 6 and len(calls) == 1
    assert re.findall(r"^step:\d+/6 val_loss:\S+ val_bpb:\S+", capsys.readouterr().out, re.M) == [
        "step:3/6 val_loss:1.0000 val_bpb:2.0000"]  # not after step 6: main validates then, once the clock stopped


def test_each_next_micro_batch_is_loaded_before_the_steps_sync(tiny, tiny_corpus, monkeypatch):
    """The host work and copy of the next batch overlap the device's work: within a step, micro-batch k+1 is loaded
    once micro-step k is queued; across steps, the next step's first micro-batch is loaded before the step's one
    blocking sync (its one host read of the device, here `tolist`). Every batch comes from a prefetch but the very
    first."""
    h, rt, model, opt = setup(tiny, tiny_corpus, iterations=3, ema_enabled=True)
    events, loader = [], tg.DistributedTokenLoader
    real_load, real_take, real_tolist = loader._load, loader.next_batch, torch.Tensor.tolist

    def take(self, *args):
        batch = real_take(self, *args)
        events.append("take")
        return batch

    monkeypatch.setattr(loader, "_load", lambda self, *args: events.append("load") or real_load(self, *args))
    monkeypatch.setattr(loader, "next_batch", take)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: events.append("sync") or real_tolist(t))  # a host read
    tg.train(model, model, opt, None, h, rt)
    assert h.grad_accum_steps(1) == 2
    step = ["take", "load", "take", "load", "sync"]  # each load: the batch taken next (prefetch)
    assert events == ["load"] + step * 3
