"""tools/bench_windows.py in-process on CPU: the figures add up and --json works (its bad arguments are rows of
tests/test_tool_exits.py). Run: python3 -m pytest tests/test_bench_windows.py"""
import json

import bench_windows


def figures(capsys, *args) -> dict:
    assert bench_windows.main([*args, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_small_split_figures_add_up(capsys):
    res = figures(capsys, "--targets", "100000", "--seq-len", "256", "--stride", "64", "--chunk", "8192", "--world",
                  "3", "--rank", "2", "--batch-windows", "7", "--repeats", "2")
    assert res["windows"] == 1 + -(-(100000 - 256) // 64) and res["pieces"] == res["windows"]  # 64 | 8192: no cuts
    assert res["chunks"] == 13 and res["table_rows"] % 7 == 0
    # rank 2's third of every chunk (within one window), each padded by fewer than 7 empty windows
    assert res["windows"] / 3 - res["chunks"] <= res["table_rows"] < res["windows"] / 3 + 8 * res["chunks"]
    assert 0 < res["total_s"] and res["ok"] == (res["total_s"] <= 0.5)
    cut = figures(capsys, "--targets", "100000", "--seq-len", "256", "--stride", "64", "--chunk", "1000", "--repeats",
                  "1")
    assert cut["pieces"] > cut["windows"] == res["windows"]  # windows straddling a chunk boundary are cut
