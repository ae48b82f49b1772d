"""Full-Hessian GPTQ export (EXPORT_QUANTIZER=gptq): the quantizer on a random correlated layer, the artifact it
writes, and calibration that reads no shard. Run: python3 -m pytest tests/test_gptq.py"""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import ROOT, RT1, one_error_line, tiny_hparams, tiny_run_env


def correlated_layer(rows=48, cols=64, n=4096, seed=0):
    """(x [n, cols], w [rows, cols]): inputs mostly in an 8-dim subspace, so their columns are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)
    return x, 0.05 * torch.randn(rows, cols, generator=g)


def row_output_error(x, w, q, scale):
    return (x @ w.T - x @ (q.float() * scale.float()[:, None]).T).square().sum(dim=0)


# Private contracts pinned here (tests/test_public_api.py PINNED): GPTQ and its quantizer on a Hessian the test
# chooses (calibration, the public path, cannot), and the unbanked matrix names (the reference's state-dict keys).
def gptq(tg, *args):
    return tg.gptq_quantize_matrix(*args)  # pinned: GPTQ on a Hessian the test chooses


def quantizer_on(tg, hessian):
    return tg.GPTQQuantizer({"m": hessian}, tiny_hparams(), calib_ms=0.0)  # pinned: on a Hessian the test chooses


def matrix_names(tg, num_layers):
    return {n for b in tg.BANK_LAYOUT for n in tg.bank_slice_names(b, num_layers)}  # pinned: reference's keys


def test_gptq_output_error_is_below_the_clip_search(tg):
    x, w = correlated_layer()
    q_clip, scale = tg.quantize_int6_rows(w)
    q = gptq(tg, w, x.T @ x, scale.float(), 0.01, 16)
    assert torch.equal(q, q.round()) and q.abs().max() <= 31  # the same int6 grid, [-31, 31]
    gptq_err, clip_err = row_output_error(x, w, q, scale).sum(), row_output_error(x, w, q_clip, scale).sum()
    assert gptq_err < 0.5 * clip_err, (gptq_err, clip_err)


def test_blocks_only_batch_the_updates(tg):
    x, w = correlated_layer(rows=16, cols=40)
    _, scale = tg.quantize_int6_rows(w)
    one, many = (gptq(tg, w, x.T @ x, scale.float(), 0.01, b) for b in (1, 16))
    assert (one == many).float().mean() > 0.99  # equal up to float rounding at a few .5 ties


def test_quantizer_falls_back_per_row_and_keeps_the_clip_scales(tg, monkeypatch):
    x, w = correlated_layer()
    q_clip, scale = tg.quantize_int6_rows(w)
    real = tg.gptq_quantize_matrix  # pinned: GPTQ on a Hessian the test chooses
    spoiled = lambda *args: torch.cat((torch.clamp(real(*args)[:10] + 3, max=31), real(*args)[10:]))
    monkeypatch.setattr(tg, "gptq_quantize_matrix", spoiled)  # pinned: rows 0-9 made worse than the clip search
    quantizer = quantizer_on(tg, x.T @ x)
    q, s = quantizer("m", w)
    assert torch.equal(s, scale) and q.dtype == torch.int8
    kept = real(w, x.T @ x, scale.float(), 0.01, 128)[10:].to(torch.int8)
    assert torch.equal(q[:10], q_clip[:10]) and torch.equal(q[10:], kept)
    assert (quantizer.rows, quantizer.fallback_rows, quantizer.matrices) == (48, 10, 1)
    assert torch.equal(quantizer("other", w)[0], q_clip) and quantizer.matrices == 1  # no Hessian: clip search


def calibrated(tg, h):
    torch.manual_seed(0)
    model = tg.build_model(h)
    with torch.no_grad():  # zero-initialised W_o and W_down would leave nothing for GPTQ to do
        model.qo_bank[h.num_layers:].normal_(0, 0.05)
        model.mlp_down_bank.normal_(0, 0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, tg.calibrate_gptq(model, state, h, RT1)


def test_gptq_artifact_loads_with_the_unchanged_loader(tg):
    h = tiny_hparams(export_quantizer="gptq", gptq_calib_seqs=3, gptq_calib_len=12, keep_float_max_numel=1000)
    state, quantizer = calibrated(tg, h)
    blob, _ = tg.pack_artifact(state, h, quantizer)
    config, loaded = tg.unpack_artifact(blob)
    model = tg.build_model(tg.Hyperparameters(**{**vars(h), **config}))
    model.load_state_dict(loaded, strict=True)
    assert quantizer.matrices == 6 * h.num_layers and quantizer.rows > 0
    _, lite = tg.unpack_artifact(tg.pack_artifact(state, h)[0])
    banks = [k for k in state if k.endswith("_bank")]
    for bank in banks:
        assert (loaded[bank] - state[bank]).abs().max() < 0.1
    assert any(not torch.equal(loaded[b], lite[b]) for b in banks)  # GPTQ changed some values
    assert torch.equal(loaded["bigram.embed.weight"], lite["bigram.embed.weight"])  # one-hot inputs: clip search


def test_calibration_reads_no_shard_and_is_reproducible(tg, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration touched the data")
    monkeypatch.setattr(tg, "read_shard", refuse)
    monkeypatch.setattr(tg, "find_shards", refuse)
    h = tiny_hparams(gptq_calib_seqs=2, gptq_calib_len=8, data_path=str(tmp_path / "gone"))
    first, second = calibrated(tg, h)[1], calibrated(tg, h)[1]
    assert set(first.hessians) == matrix_names(tg, h.num_layers)
    assert all(torch.equal(first.hessians[k], second.hessians[k]) for k in first.hessians)
    q_in = first.hessians["blocks.0.attn.c_q.weight"]  # normalized inputs: mean diag = number of tokens
    assert abs(q_in.diagonal().mean().item() - 2 * 8) < 1e-3


def test_a_matrix_without_a_cholesky_factor_falls_back_to_the_clip_search(tg, capsys):
    x, w = correlated_layer()
    q_clip, scale = tg.quantize_int6_rows(w)
    quantizer = quantizer_on(tg, -(x.T @ x))  # not positive definite
    q, s = quantizer("m", w)
    assert torch.equal(q, q_clip) and torch.equal(s, scale)
    assert quantizer.fallback_matrices == 1 and quantizer.matrices == 0
    assert "gptq_fallback matrix:m reason:no_cholesky_factor quantizer:gptq_lite" in capsys.readouterr().out
    assert "fallback_matrices:1" in quantizer.log()


def test_nonfinite_gptq_values_fall_back_to_the_clip_search(tg, monkeypatch, capsys):
    x, w = correlated_layer()
    nan = lambda w, *args: torch.full_like(w, float("nan"))
    monkeypatch.setattr(tg, "gptq_quantize_matrix", nan)  # pinned: GPTQ on a Hessian the test chooses
    q, _ = quantizer_on(tg, x.T @ x)("m", w)
    assert torch.equal(q, tg.quantize_int6_rows(w)[0])
    assert "gptq_fallback matrix:m reason:nonfinite_values" in capsys.readouterr().out


def test_least_calibration_at_the_smallest_damping_exports(tg):
    h = tiny_hparams(export_quantizer="gptq", gptq_calib_seqs=1, gptq_calib_len=2, gptq_damp=1e-4,
                     gptq_calib_temperature=1e-3, keep_float_max_numel=1000)
    h.validate()  # the most degenerate settings validation accepts
    state, quantizer = calibrated(tg, h)
    config, loaded = tg.unpack_artifact(tg.pack_artifact(state, h, quantizer)[0])
    assert quantizer.matrices + quantizer.fallback_matrices == 6 * h.num_layers
    assert all(bool(torch.isfinite(t).all()) for t in loaded.values() if t.is_floating_point())


@pytest.mark.parametrize("env", [{"GPTQ_DAMP": "1e-6"}, {"GPTQ_CALIB_TEMPERATURE": "1e-40"},
                                 {"GPTQ_CALIB_LEN": "1"}, {"GPTQ_CALIB_SEQS": "0"}])
def test_degenerate_gptq_settings_are_refused_up_front(tg, env):
    with pytest.raises(tg.UserError, match=next(iter(env))):
        tg.Hyperparameters.from_env(env)


def bf16_only_attention(q, k, v):
    """FlashAttention-3/4's dtype rule: bf16 or fp16 inputs only."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16 data type, got {q.dtype}")
    return train_gpt.sdpa_attention(q, k, v)


def test_calibration_runs_under_the_evaluation_autocast_with_a_bf16_only_attention(tg, monkeypatch):
    """On CUDA, training and evaluation run under bf16 autocast and FlashAttention accepts nothing else; the Hessian
    pass must too (it used to run in fp32 and crash after training). CUDA's autocast is simulated on the CPU."""
    cpu_bf16 = lambda rt: torch.autocast("cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(tg, "autocast", cpu_bf16)  # pinned: CUDA's bf16 autocast, simulated on the CPU
    h = tiny_hparams(gptq_calib_seqs=2, gptq_calib_len=8, keep_float_max_numel=1000)
    fa = tg.AttentionCandidate("fa", lambda: bf16_only_attention)
    rt = tg.with_attention(RT1, h, candidates=(fa,))
    torch.manual_seed(0)
    model = tg.build_model(h, rt)
    with torch.no_grad():
        model.qo_bank[h.num_layers:].normal_(0, 0.05)
        model.mlp_down_bank.normal_(0, 0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantizer = tg.calibrate_gptq(model, state, h, rt)
    names = matrix_names(tg, h.num_layers)
    assert set(quantizer.hessians) == names
    for name, hessian in quantizer.hessians.items():  # every slice recorded (bf16 bank copies are found too), fp32
        assert hessian.dtype == torch.float32 and torch.isfinite(hessian).all() and hessian.trace() > 0, name
    q_in = quantizer.hessians["blocks.0.attn.c_q.weight"]  # normalized inputs: mean diag = number of tokens
    assert abs(q_in.diagonal().mean().item() - 2 * 8) < 0.1
    assert "banks" not in vars(model)  # the recorder's hook on model.banks is gone again
    blob, _ = tg.pack_artifact(state, h, quantizer)
    assert quantizer.matrices == 6 * h.num_layers and tg.unpack_artifact(blob)[1].keys() == state.keys()


def test_bad_quantizer_setting_is_a_user_error(tg):
    with pytest.raises(tg.UserError, match="EXPORT_QUANTIZER"):
        tg.Hyperparameters.from_env({"EXPORT_QUANTIZER": "gptq2"})


WRAPPER = """import shutil, sys
sys.path.insert(0, {root!r})
import train_gpt as tg
real_train = tg.train
def train_then_remove_shards(*args, **kwargs):
    result = real_train(*args, **kwargs)
    shutil.rmtree({data!r})
    return result
tg.train = train_then_remove_shards
tg.main()
"""


@pytest.mark.slow
def test_gptq_run_exports_after_the_shards_are_gone(tiny_corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_corpus[0], data)
    env = tiny_run_env(tiny_corpus, tmp_path, DATA_PATH=str(data), EXPORT_QUANTIZER="gptq", GPTQ_CALIB_SEQS="4",
                       GPTQ_CALIB_LEN="32", KEEP_FLOAT_MAX_NUMEL="1000", ITERATIONS="8", VAL_LOSS_EVERY="0")
    (tmp_path / "logs").mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), data=str(data)))
    proc = subprocess.run([sys.executable, str(wrapper)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not data.exists()
    log = proc.stdout
    m = re.search(r"^gptq calib_seqs:4 calib_tokens:128 matrices:12 rows:(\d+) fallback_rows:(\d+) "
                  r"fallback_matrices:0 calib_time:\d+ms quant_time:\d+ms gptq_time:\d+ms$", log, re.M)
    assert m and int(m.group(2)) <= int(m.group(1)), log[-3000:]
    assert re.search(r"^export quantizer:gptq codec:rans payload_bytes:\d+ model_bytes:\d+$", log, re.M)
    assert re.search(r"^final_int6_zstd_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)


@pytest.mark.slow
def test_bench_gptq_reports_both_quantizers_on_the_same_weights(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="4", VAL_LOSS_EVERY="0", GPTQ_CALIB_SEQS="2",
                       GPTQ_CALIB_LEN="16", TRAIN_LOG_EVERY="100", VAL_MAX_TOKENS="1024", KEEP_FLOAT_MAX_NUMEL="1000")
    (tmp_path / "logs").mkdir()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gptq.py"), "--json", "-"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["iterations"] == 4 and res["gptq"]["matrices"] == 12 and "fallback_rows" in res["gptq"]
    for name in ("gptq_lite", "gptq"):
        assert abs(res[name]["gap"] - (res[name]["bpb"] - res["fp_bpb"])) < 2e-5
        assert res[name]["model_bytes"] > 0 and f"bench_gptq quantizer:{name} " in out.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gptq.py")], capture_output=True, text=True,
                         env=dict(env, DATA_PATH=str(tmp_path / "missing")), timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    one_error_line(bad.stderr)
