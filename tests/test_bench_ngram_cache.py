"""tools/bench_ngram_cache.py in-process on CPU: the README commands' flags work (--json PATH and --json -), figures
add up (its bad arguments are rows of tests/test_tool_exits.py). Run: python3 -m pytest tests/test_bench_ngram_cache.py"""
import json

import torch

import bench_ngram_cache

ARGS = ["--tokens", "6000", "--chunk", "500", "--vocab", "64", "--device", "cpu", "--edge-chunks", "3",
        "--batch-positions", "256", "--log-every", "0"]


def run_tool(capsys, *args) -> str:
    """The tool's stdout (its main in this process)."""
    assert bench_ngram_cache.main([*ARGS, *args]) == 0
    return capsys.readouterr().out


def test_json_to_stdout_and_to_a_file_agree_on_the_table_sizes(tmp_path, capsys):
    res = json.loads(run_tool(capsys, "--json", "-"))  # stdout is only the JSON
    assert res["chunks"] == 12 and res["tokens"] == 6000
    assert res["update_s"] > 0 and res["lookup_s"] > 0
    assert res["update_ms_per_chunk_first"] > 0 and res["update_ms_per_chunk_last"] > 0
    tables = res["tables"]
    assert len(tables["runs"]) == 2 and all(r >= 1 for r in tables["runs"])  # one table of contexts, one of pairs
    assert tables["pairs"] >= tables["contexts"] > 0  # every context has a next token
    assert "update_ms_per_chunk_last:" in run_tool(capsys, "--json", str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text())["tables"] == tables  # same stream, same tables


def test_count_reports_few_ops_and_syncs_and_the_same_answers(capsys):
    """--count: no host sync on the lookup path, 2 per chunk update, and few ops (fde52ff's per-batch lookups took
    1,458 ops per 1,000 targets here and its updates 681-911 ops with 104-128 syncs); the counts do not change the
    answers (same checksum as a plain run)."""
    res = json.loads(run_tool(capsys, "--json", "-", "--count"))
    assert res["lookup_syncs_per_1k_targets"] == 0 and res["update_syncs_per_chunk_max"] == 2
    assert 0 < res["lookup_ops_per_1k_targets"] < 300 and 0 < res["update_ops_per_chunk_max"] < 300
    assert res["sync_ops"] == {"tolist": 2 * 11}  # the 11 updated chunks: sizes of the distinct and the new keys
    assert res["lookup_checksum"] == json.loads(run_tool(capsys, "--json", "-"))["lookup_checksum"]


def test_op_counter_rule():
    """The counter's sync rule on known calls: each data-dependent size or host read is one sync, other ops none."""
    x, counter = torch.arange(10), bench_ngram_cache.OpCounter()
    with counter:
        y = (x + 1) * 2
        torch.searchsorted(x, y)
        x.repeat_interleave(x, output_size=45)
        ops, syncs = counter.take()
        assert ops >= 4 and syncs == 0
        x[x > 3]
        torch.unique(x)
        int(x.sum())
        x.tolist()
        x.repeat_interleave(x)
        x.nonzero()
        z = x.clone()
        z[x > 5] = 0
    ops, syncs = counter.take()
    assert syncs == 7 and ops >= 11
    names = dict(counter.sync_names)
    assert names.pop("item", 0) + names.pop("_local_scalar_dense", 0) == 1  # int(): one or the other, by build
    assert names == {"index": 1, "_unique2": 1, "tolist": 1, "repeat_interleave": 1, "nonzero": 1, "index_put_": 1}
    assert "tolist" not in torch.Tensor.__dict__  # the host-read hooks are gone
