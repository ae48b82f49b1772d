"""Training loop pieces: the compile warm-up is undone exactly; one train step lowers the loss.
Run: python3 -m pytest tests/test_training.py"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import RT1, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def setup(tiny, tiny_corpus, **overrides):
    data, tok, vocab = tiny_corpus
    h = tiny(data_path=data, tokenizer_path=tok, vocab_size=vocab, **overrides)
    model = tiny_model(h)
    return h, RT1, model, tg.build_optimizers(model, h, RT1)


def flat_state(opt_state):
    """All tensors of a (nested) optimizer state dict, in a stable order."""
    out = []
    if isinstance(opt_state, torch.Tensor):
        return [opt_state]
    if isinstance(opt_state, dict):
        for k in sorted(opt_state, key=str):
            out += flat_state(opt_state[k])
    elif isinstance(opt_state, (list, tuple)):
        for v in opt_state:
            out += flat_state(v)
    return out


def test_warmup_leaves_model_and_optimizer_bit_identical(tiny, tiny_corpus):
    h, rt, model, opt = setup(tiny, tiny_corpus, warmup_steps=3)
    loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(model, opt, loader, h, rt, 0, 1.0)  # non-empty optimizer state before the warm-up
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    tg.warmup_and_restore(model, model, opt, h, rt)
    assert model.qat_active is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    after, ref = flat_state(opt.state_dict()), flat_state(before_opt)
    assert len(after) == len(ref) and len(ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, ref))
    # and the restored optimizer continues exactly as the untouched one would
    loader_a = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(model, opt, loader_a, h, rt, 1, 1.0)
    replay_model = tg.build_model(h, rt)
    replay_model.load_state_dict(before_model)
    replay_opt = tg.build_optimizers(replay_model, h, rt)
    replay_opt.load_state_dict(copy.deepcopy(before_opt))
    loader_b = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(replay_model, replay_opt, loader_b, h, rt, 1, 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, replay_model.state_dict()[k]), k


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
                                                                                         monkeypatch):
    h, rt, model, opt = setup(tiny, tiny_corpus, val_loss_every=3, iterations=6, val_last_step=True)
    calls = []
    monkeypatch.setattr(tg, "validate_during_training", lambda *args: calls.append(args[4]))
    result = tg.train(model, model, opt, None, h, rt)
    assert result.steps == 6 and calls == [3]
    assert tg.should_validate(result.steps, True, h)  # train_and_export runs it after taking t_end
    assert not tg.should_validate(result.steps, True, tiny(val_loss_every=3))  # VAL_LAST_STEP=0 (the default): none


def test_each_next_micro_batch_is_loaded_before_the_steps_sync(tiny, tiny_corpus, monkeypatch):
    """The host work and copy of the next batch overlap the device's work: within a step, micro-batch k+1 is loaded
    once micro-step k is queued; across steps, the next step's first micro-batch is loaded before the step's one
    blocking sync (reduce_step_status). Every batch comes from a prefetch but the very first."""
    h, rt, model, opt = setup(tiny, tiny_corpus, iterations=3, ema_enabled=True)
    events, loader = [], tg.DistributedTokenLoader
    real_load, real_take, real_sync = loader._load, loader.next_batch, tg.reduce_step_status

    def take(self, *args):
        batch = real_take(self, *args)
        events.append("take")
        return batch

    monkeypatch.setattr(loader, "_load", lambda self, *args: events.append("load") or real_load(self, *args))
    monkeypatch.setattr(loader, "next_batch", take)
    monkeypatch.setattr(tg, "reduce_step_status", lambda *args: events.append("sync") or real_sync(*args))
    tg.train(model, model, opt, None, h, rt)
    assert h.grad_accum_steps(1) == 2
    step = ["take", "load", "take", "load", "sync"]  # each load: the batch taken next (prefetch)
    assert events == ["load"] + step * 3
