"""tools/bench_ngram_cache.py on CPU: the README commands' flags work (--json PATH and --json -), figures add up.
Run: python3 -m pytest tests/test_bench_ngram_cache.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_ngram_cache.py"
ARGS = ["--tokens", "6000", "--chunk", "500", "--vocab", "64", "--device", "cpu", "--edge-chunks", "3",
        "--batch-positions", "256", "--log-every", "0"]


def run_tool(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOL), *ARGS, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_json_to_stdout_and_to_a_file_agree_on_the_table_sizes(tmp_path):
    res = json.loads(run_tool(tmp_path, "--json", "-").stdout)  # stdout is only the JSON
    assert res["chunks"] == 12 and res["tokens"] == 6000
    assert res["update_s"] > 0 and res["lookup_s"] > 0
    assert res["update_ms_per_chunk_first"] > 0 and res["update_ms_per_chunk_last"] > 0
    tables = res["tables"]
    assert len(tables["contexts"]) == len(tables["pairs"]) == 8 and all(r >= 1 for r in tables["runs"])
    assert all(p >= c > 0 for c, p in zip(tables["contexts"], tables["pairs"]))  # every context has a next token
    proc = run_tool(tmp_path, "--json", "out.json")
    assert "update_ms_per_chunk_last:" in proc.stdout
    assert json.loads((tmp_path / "out.json").read_text())["tables"] == tables  # same stream, same tables


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--tokens", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--tokens" in proc.stderr
