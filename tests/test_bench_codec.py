"""tools/bench_codec.py: every codec row decodes to the same object, ratios are to zstd-22, the synthetic payload has
the record's export policy and the demo model's statistics. Run: python3 -m pytest tests/test_bench_codec.py"""
import json
import math

import pytest
import torch

import bench_codec  # tools/ (conftest puts it on sys.path)
import train_gpt as tg
from conftest import one_error_line

pytest.importorskip("brotli")


def matrices_by_type(state, h):
    """type of SYNTHETIC_TYPES -> the matrices of that type (a bank's slices split by the model's bank layout)."""
    out = {}
    for name, t in state.items():
        if name in bench_codec.BANK_TYPES:
            for j, w in enumerate(t):
                out.setdefault(bench_codec.BANK_TYPES[name][j // h.num_layers], []).append(w)
        else:
            out.setdefault(next((k for k in bench_codec.SYNTHETIC_TYPES if k in name), None), []).append(t)
    return out


def test_synthetic_state_follows_the_type_table(small_h):
    state = bench_codec.synthetic_state(small_h, std=0.2, seed=3)
    model = tg.build_model(small_h).state_dict()
    assert state.keys() == model.keys() and all(state[k].dtype == model[k].dtype for k in model)
    assert all(state[k].shape == model[k].shape for k in model)
    by_type = matrices_by_type(state, small_h)
    for name, (rel, row_logsd, col_logsd, _) in bench_codec.SYNTHETIC_TYPES.items():
        ws = [t.float() for t in by_type[name]]
        std = math.sqrt(sum(float(w.square().sum()) for w in ws) / sum(w.numel() for w in ws))
        expected = 0.2 * rel * math.exp(row_logsd ** 2 + col_logsd ** 2)  # E[exp(2σZ)] = exp(2σ²) per factor
        assert std == pytest.approx(expected, rel=0.2), name
    again = bench_codec.synthetic_state(small_h, std=0.2, seed=3)
    assert all(torch.equal(again[k], state[k]) for k in state)  # seeded


def test_measure_rows_decode_identically_and_ratio_is_to_zstd(small_h, capsys):
    state = bench_codec.synthetic_state(small_h, std=0.2)
    rows = bench_codec.measure(bench_codec.int6_object(state, small_h))
    assert [r["codec"] for r in rows] == ["zstd-22", "rans", "brotli-11", "lzma-9e"]
    assert rows[0]["ratio_vs_zstd"] == 1.0 and all(r["decoded_identical"] for r in rows)
    assert rows[1]["bytes"] == len(tg.pack_artifact(state, small_h)[0])  # what the script's export writes
    for r in rows:
        assert r["ratio_vs_zstd"] == pytest.approx(r["bytes"] / rows[0]["bytes"]) and r["decode_s"] >= 0


def test_cli_on_an_artifact_prints_the_table_and_json(small_h, tmp_path, capsys):
    state = bench_codec.synthetic_state(small_h, std=0.2)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.pack_artifact(state, small_h)[0])
    assert bench_codec.main(["--artifact", str(path), "--json", "-"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    # README's export policy: every float matrix of more than KEEP_FLOAT_MAX_NUMEL weights but the token embedding
    matrices = [w for name, t in state.items() for w in (t if name in bench_codec.BANK_TYPES else [t])
                if name != "tok_emb.weight" and w.is_floating_point()]
    assert data["int6_values"] == sum(w.numel() for w in matrices if w.numel() > small_h.keep_float_max_numel)
    assert "| rans |" in out.err and len(data["rows"]) == 4
    assert bench_codec.main(["--artifact", str(tmp_path / "absent.ptz")]) == 2
    one_error_line(capsys.readouterr().err)
