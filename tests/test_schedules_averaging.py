"""LR / momentum schedules, late-QAT trigger, EMA and SWA. Run: python3 -m pytest tests/test_schedules_averaging.py"""
import dataclasses

import pytest
import torch

import train_gpt as tg


def test_muon_momentum_warmup_values():
    h = tg.Hyperparameters()
    assert tg.muon_momentum(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum(500, h) == pytest.approx(0.92 + 0.07 / 3, abs=1e-4)  # 0.9433
    assert tg.muon_momentum(1500, h) == pytest.approx(0.99)
    assert tg.muon_momentum(5000, h) == pytest.approx(0.99)


def test_wallclock_warmdown():
    h = tg.Hyperparameters()  # cap 600 s, warm-down 3500 steps
    step_ms = 88.6
    assert tg.lr_scale(1000, 1000 * step_ms, h) == 1.0
    # LOG check of SPEC §3.7: at 510 s with ~88.6 ms/step, scale = 90 s / 310 s
    step = 5757
    assert tg.lr_scale(step, 510_000.0, h) == pytest.approx(90_000 / (3500 * 510_000 / step), rel=1e-9)
    assert tg.lr_scale(step, 600_000.0, h) == 0.0
    # linear in time: halfway through the warm-down window the multiplier is one half
    window = 3500 * step_ms
    elapsed = 600_000 - window / 2
    assert tg.lr_scale(round(elapsed / step_ms), elapsed, h) == pytest.approx(0.5, abs=1e-3)


def test_step_based_warmdown_without_cap():
    h = dataclasses.replace(tg.Hyperparameters(), max_wallclock_seconds=0.0, iterations=100, warmdown_iters=20)
    assert tg.lr_scale(79, 0.0, h) == 1.0
    assert tg.lr_scale(80, 0.0, h) == pytest.approx(1.0)
    assert tg.lr_scale(90, 0.0, h) == pytest.approx(0.5)
    assert tg.lr_scale(5, 0.0, dataclasses.replace(h, warmdown_iters=0)) == 1.0


def test_qat_trigger_follows_the_wall_clock_budget():
    h = tg.Hyperparameters()
    assert not tg.qat_should_start(10_000, 509_000.0, h)  # the step count does not matter under a time budget
    assert tg.qat_should_start(1, 510_000.0, h)
    assert not tg.qat_should_start(1, 599_000.0, dataclasses.replace(h, qat_enabled=False))


def test_qat_trigger_follows_iterations_in_step_based_runs():
    h = dataclasses.replace(tg.Hyperparameters(), max_wallclock_seconds=0.0, iterations=200)
    assert not tg.qat_should_start(169, 1e9, h)  # elapsed time does not matter without a time budget
    assert tg.qat_should_start(170, 0.0, h)
    assert not tg.qat_should_start(199, 0.0, dataclasses.replace(h, qat_enabled=False))


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
    assert state["b"].dtype == torch.float32
    assert tg.cast_like(state, dict(m.state_dict()))["b"].dtype == torch.bfloat16


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
