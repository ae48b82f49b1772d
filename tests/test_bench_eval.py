"""tools/bench_eval.py runs on a tiny shape and reports a consistent JSON record.
Run: python3 -m pytest tests/test_bench_eval.py -q"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_json_figures_are_consistent(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_eval.py"), "--tokens", "3000", "--layers", "1", "--dim", "32",
           "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--seq-len", "64", "--stride", "16",
           "--batch-windows", "8", "--chunk", "1024", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tokens"] == 3000 and res["model"]["layers"] == 1 and res["chunk"] == 1024 and res["mixer"] == "learned"
    assert res["ratio"] == pytest.approx(res["roundtrip_plus_ngram_s"] / res["roundtrip_s"], rel=1e-2)  # seconds are rounded
    assert 0 < res["ngram_lookup_s"] and 0 < res["ngram_update_s"]
    assert res["ngram_lookup_s"] + res["ngram_update_s"] < res["ngram_s"] < res["roundtrip_plus_ngram_s"]
    assert res["ratio_within_run"] > 1
    assert set(res["bpb"]) == {"model", "ngram"} and all(v > 0 for v in res["bpb"].values())
    assert f"ratio:{res['ratio']}" in proc.stdout
