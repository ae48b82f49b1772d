"""tools/bench_windows.py on CPU: figures add up, --json works, bad arguments exit 2.
Run: python3 -m pytest tests/test_bench_windows.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_windows.py"


def run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True, timeout=120)


def test_small_split_figures_add_up():
    proc = run_tool("--targets", "100000", "--seq-len", "256", "--stride", "64", "--chunk", "8192", "--world", "3",
                    "--rank", "2", "--batch-windows", "7", "--repeats", "2", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["windows"] == 1 + -(-(100000 - 256) // 64) and res["pieces"] == res["windows"]  # 64 | 8192: no cuts
    assert res["chunks"] == 13 and res["table_rows"] % 7 == 0
    assert 0 < res["total_s"] and res["ok"] == (res["total_s"] <= 0.5)
    cut = json.loads(run_tool("--targets", "100000", "--seq-len", "256", "--stride", "64", "--chunk", "1000",
                              "--repeats", "1", "--json", "-").stdout)
    assert cut["pieces"] > cut["windows"] == res["windows"]  # windows straddling a chunk boundary are cut


def test_bad_arguments_exit_2():
    proc = run_tool("--rank", "8", "--world", "8")
    assert proc.returncode == 2 and "--rank" in proc.stderr
