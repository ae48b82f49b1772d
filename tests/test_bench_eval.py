"""tools/bench_eval.py runs on a tiny shape and reports a consistent JSON record (its main(argv), in this process).
Run: python3 -m pytest tests/test_bench_eval.py -q"""
import json

import pytest

import bench_eval  # tools/ is on sys.path (conftest)
import train_gpt as tg


def test_bench_eval_json_figures_are_consistent(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    argv = ["--tokens", "3000", "--layers", "1", "--dim", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64",
            "--seq-len", "64", "--stride", "16", "--batch-windows", "8", "--chunk", "1024", "--repeats", "1",
            "--json", str(out)]
    code = bench_eval.main(argv)
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tokens"] == 3000 and res["model"]["layers"] == 1 and res["chunk"] == 1024
    assert res["mixer"] == tg.Hyperparameters().ngram_mixer  # by default the record configuration's mixer
    assert res["ratio"] == pytest.approx(res["roundtrip_plus_ngram_s"] / res["roundtrip_s"], rel=1e-2)  # seconds are rounded
    assert 0 < res["ngram_lookup_s"] and 0 < res["ngram_update_s"]
    assert res["ngram_lookup_s"] + res["ngram_update_s"] < res["ngram_s"] < res["roundtrip_plus_ngram_s"]
    assert res["ratio_within_run"] > 1
    assert set(res["bpb"]) == {"model", "ngram"} and all(v > 0 for v in res["bpb"].values())
    assert f"ratio:{res['ratio']}" in stdout
