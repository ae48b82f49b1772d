"""LR / momentum schedules, late-QAT trigger, EMA and SWA. Run: python3 -m pytest tests/test_schedules_averaging.py"""
import contextlib
import io

import pytest
import torch

import train_gpt as tg
from conftest import RT1, FakeClock, tiny_hparams, tiny_model


def loop_decisions(tiny_corpus, monkeypatch, tick_s: float, **settings) -> tuple[list, str]:
    """([(LR scale, QAT on)] that train() hands each step, its log): the step itself is a stand-in with a constant
    loss, so the schedule alone runs (the clock advances `tick_s` per step)."""
    data, _, vocab = tiny_corpus
    h = tiny_hparams(data_path=data, vocab_size=vocab, **settings)
    model, seen = tiny_model(h), []

    def step(m, opt, loader, hh, rt, i, scale):
        assert i == len(seen)
        seen.append((scale, model.qat_active))
        return torch.tensor(1.0)
    monkeypatch.setattr(tg, "train_step", step)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = tg.train(model, model, None, None, h, RT1, clock=FakeClock(tick_s))
    assert result.steps == len(seen) and model.qat_active is False  # QAT ends with the loop
    return seen, log.getvalue()


def test_muon_momentum_warms_up_linearly_then_holds(tiny_corpus):
    h = tiny_hparams(data_path=tiny_corpus[0], vocab_size=tiny_corpus[2], muon_momentum_warmup_steps=300)
    start, end = h.muon_momentum_warmup_start, h.muon_momentum
    model = tiny_model(h)
    opt = tg.build_optimizers(model, h, RT1)
    loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), RT1, h.vocab_size)
    for step, want in ((0, start), (100, start + (end - start) / 3), (300, end), (5000, end)):
        tg.train_step(model, opt, loader, h, RT1, step, 1.0)
        assert opt.muon.momentum == pytest.approx(want, abs=1e-12), step
    assert start < end  # the record's warm-up rises (0.92 -> 0.99)


# A 1 s budget at 62.5 ms per step (exact in binary): the cap stops the loop after 16 steps, whatever ITERATIONS.
BUDGET = dict(iterations=1000, max_wallclock_seconds=1.0)
TICK = 0.0625


def test_wallclock_warmdown_is_linear_in_the_remaining_time(tiny_corpus, monkeypatch):
    """The last WARMDOWN_ITERS steps' worth of time (estimated from the step time so far, 4 x 62.5 ms) scale the LR
    from 1 to 0: step k (after k steps, k x 62.5 ms) gets (1000 - 62.5 k) / 250."""
    seen, log = loop_decisions(tiny_corpus, monkeypatch, TICK, warmdown_iters=4, qat_enabled=False, **BUDGET)
    assert [scale for scale, _ in seen] == [1.0] * 13 + [0.75, 0.5, 0.25]
    assert "stopping_early: wallclock_cap train_time:1062ms step:16/1000" in log  # (+ the loop's closing reading)


def test_step_based_warmdown_without_a_cap(tiny_corpus, monkeypatch):
    """Without a time budget, the last WARMDOWN_ITERS of ITERATIONS steps scale the LR; the clock does not matter."""
    steps = dict(iterations=20, max_wallclock_seconds=0.0, qat_enabled=False)
    seen, _ = loop_decisions(tiny_corpus, monkeypatch, 1e6, warmdown_iters=5, **steps)
    assert [scale for scale, _ in seen] == pytest.approx([1.0] * 16 + [0.8, 0.6, 0.4, 0.2], abs=1e-12)
    seen, _ = loop_decisions(tiny_corpus, monkeypatch, 1e6, warmdown_iters=0, **steps)
    assert [scale for scale, _ in seen] == [1.0] * 20


def test_qat_trigger_follows_the_wall_clock_budget(tiny_corpus, monkeypatch):
    """QAT starts once 1 - QAT_TIME_FRAC of the time budget is spent (750 ms: after 12 steps), not by step count,
    and stays on to the end of the loop."""
    seen, log = loop_decisions(tiny_corpus, monkeypatch, TICK, qat_time_frac=0.25, **BUDGET)
    assert [qat for _, qat in seen] == [False] * 12 + [True] * 4
    assert "qat_start step:12 progress:0.750 " in log
    seen, log = loop_decisions(tiny_corpus, monkeypatch, TICK, qat_time_frac=0.25, qat_enabled=False, **BUDGET)
    assert not any(qat for _, qat in seen) and "qat_start" not in log


def test_qat_trigger_follows_iterations_in_step_based_runs(tiny_corpus, monkeypatch):
    steps = dict(iterations=20, max_wallclock_seconds=0.0, qat_time_frac=0.15)
    seen, log = loop_decisions(tiny_corpus, monkeypatch, 1e6, **steps)  # elapsed time does not matter
    assert [qat for _, qat in seen] == [False] * 17 + [True] * 3 and "qat_start step:17 progress:0.850 " in log
    seen, _ = loop_decisions(tiny_corpus, monkeypatch, 1e6, qat_enabled=False, **steps)
    assert not any(qat for _, qat in seen)


class Tiny(torch.nn.Module):
    """Known values, not a language model: one fp32 and one bf16 parameter for the averaging closed forms."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    m, decay = Tiny(), 0.9
    ema = tg.EMA(m, decay)
    history = []
    for _ in range(7):
        with torch.no_grad():
            m.a.copy_(torch.randn(3))
            m.b.copy_(torch.randn(2))
        history.append((m.a.detach().clone(), m.b.detach().float().clone()))
        ema.update(m)
    k = len(history)
    expect_a = sum((1 - decay) * decay ** (k - 1 - i) * a for i, (a, _) in enumerate(history))  # initial value 0
    expect_b = sum((1 - decay) * decay ** (k - 1 - i) * b for i, (_, b) in enumerate(history))
    state = ema.state()
    torch.testing.assert_close(state["a"], expect_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["b"], expect_b, rtol=1e-6, atol=1e-6)
    assert state["b"].dtype == torch.float32  # fp32 whatever the parameter's dtype


def test_swa_is_the_mean_of_snapshots():
    swa = tg.SWA()
    with pytest.raises(tg.RunFailed, match="SWA has no snapshots"):
        swa.state()
    snaps = [{"w": torch.full((2,), float(i))} for i in (1, 2, 6)]
    for s in snaps:
        swa.add(s)
    assert swa.count == 3
    torch.testing.assert_close(swa.state()["w"], torch.full((2,), 3.0))
    assert snaps[0]["w"][0] == 1.0  # snapshots are not modified
