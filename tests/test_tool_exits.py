"""The exit-code convention of every command in tools/ and data/ (tools/toolkit.py, README "When something is
wrong"): every bad argument is one `error:` line and exit 2, before any work; a failed check is 4; SIGINT/SIGTERM
are 130/143 with one line; nothing else but a bug returns 1.

Run: python3 -m pytest tests/test_tool_exits.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench_codec
import bench_eval
import bench_gptq
import bench_ngram_cache
import bench_ngram_mixer
import bench_train
import bench_windows
import compress
import logparse
import install_flash_attn
import make_record
import pack
import plot_logs
import preflight
import significance
import summarize_logs
import toolkit
from conftest import ROOT, load_data_script, one_error_line

make_dataset = load_data_script("make_dataset")
cached = load_data_script("cached_challenge_fineweb")

TINY_EVAL = ["--layers", "1", "--dim", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--seq-len", "64",
             "--stride", "16", "--repeats", "1"]
# (tool, argv, exit code, words of the one error line). {d}: a fresh folder holding a.txt, b.txt and link.txt
# (a symbolic link to a.txt); {d}/missing does not exist.
BAD_ARGUMENTS = [
    ("significance", ["--baseline", "nan", "--logs", "{d}/a.txt", "{d}/b.txt"], 2, ["--baseline", "finite number > 0"]),
    ("significance", ["--baseline", "inf", "--logs", "{d}/a.txt", "{d}/b.txt"], 2, ["--baseline", "finite"]),
    ("significance", ["--baseline", "-1", "--logs", "{d}/a.txt", "{d}/b.txt"], 2, ["--baseline", "> 0"]),
    ("significance", ["--baseline", "1", "--alpha", "5", "--logs", "{d}/a.txt", "{d}/b.txt"], 2, ["--alpha", "(0, 1)"]),
    ("significance", ["--baseline", "1", "--alpha", "0", "--logs", "{d}/a.txt", "{d}/b.txt"], 2, ["--alpha", "(0, 1)"]),
    ("significance", ["--baseline", "1", "--min-improvement", "-0.1", "--logs", "{d}/a.txt", "{d}/b.txt"], 2,
     ["--min-improvement", ">= 0"]),
    ("significance", ["--baseline", "1", "--min-improvement", "1", "--logs", "{d}/a.txt", "{d}/b.txt"], 2,
     ["--min-improvement", "below --baseline"]),
    ("significance", ["--baseline", "1", "--logs", "{d}/a.txt", "{d}/a.txt"], 2, ["a.txt", "same file"]),
    ("significance", ["--baseline", "1", "--logs", "{d}/a.txt", "{d}/link.txt"], 2, ["link.txt", "same file"]),
    ("summarize_logs", ["{d}/a.txt", "{d}/a.txt"], 2, ["same file"]),
    ("summarize_logs", ["{d}/a.txt", "--json", "{d}/a.txt"], 2, ["--json", "is the input"]),
    ("plot_logs", ["{d}/a.txt", "-o", "{d}/x.foo"], 2, ["-o", "unknown image format .foo", ".png"]),
    ("plot_logs", ["{d}/a.txt", "-o", "{d}/curves"], 2, ["-o", "(no extension)"]),
    ("plot_logs", ["{d}/a.txt", "{d}/link.txt", "-o", "{d}/x.png"], 2, ["same file"]),
    ("plot_logs", ["{d}/a.txt", "-o", "{d}/a.txt"], 2, ["unknown image format .txt"]),
    ("make_record", ["--name", "x", "--out", "{d}/rec", "{d}/a.txt", "{d}/a.txt"], 2,
     ["same file", "nothing was created"]),
    ("make_record", ["--name", "bad name", "--out", "{d}/rec", "{d}/a.txt"], 2, ["--name"]),
    ("make_record", ["--name", "x", "--date", "2026-13-01", "{d}/a.txt"], 2, ["--date", "YYYY-MM-DD"]),
    ("bench_eval", ["--tokens", "0"], 2, ["--tokens", ">= 1"]),
    ("bench_eval", ["--tokens", "-5"], 2, ["--tokens"]),
    ("bench_eval", ["--tokens", "many"], 2, ["--tokens", "'many'"]),
    ("bench_eval", ["--layers", "0"], 2, ["--layers"]),
    ("bench_eval", ["--vocab", "1"], 2, ["--vocab", "[2, 65536]"]),
    ("bench_eval", ["--vocab", "70000"], 2, ["--vocab"]),
    ("bench_eval", ["--seq-len", "1"], 2, ["--seq-len"]),
    ("bench_eval", ["--repeats", "0"], 2, ["--repeats"]),
    ("bench_eval", ["--chunk", "0"], 2, ["--chunk"]),
    ("bench_eval", ["--batch-windows", "0"], 2, ["--batch-windows"]),
    ("bench_eval", ["--seed", "-1"], 2, ["--seed"]),
    ("bench_eval", ["--device", "tpu"], 2, ["--device", "invalid choice"]),
    ("bench_eval", [*TINY_EVAL, "--heads", "3"], 2, ["NUM_HEADS=3"]),
    ("bench_eval", [*TINY_EVAL, "--stride", "65"], 2, ["EVAL_STRIDE=65", "EVAL_SEQ_LEN=64"]),
    ("bench_eval", [*TINY_EVAL, "--val-shards", "{d}/missing"], 2, ["missing"]),
    ("bench_eval", [*TINY_EVAL, "--json", "{d}/missing/x.json"], 2, ["--json", "does not exist"]),
    ("bench_ngram_cache", ["--tokens", "0"], 2, ["--tokens", ">= 1"]),
    ("bench_ngram_cache", ["--tokens", "-3"], 2, ["--tokens"]),
    ("bench_ngram_cache", ["--vocab", "1"], 2, ["--vocab"]),
    ("bench_ngram_cache", ["--chunk", "0"], 2, ["--chunk"]),
    ("bench_ngram_cache", ["--min-order", "1"], 2, ["--min-order", ">= 2"]),
    ("bench_ngram_cache", ["--min-order", "5", "--max-order", "3"], 2, ["--min-order 5", "--max-order 3"]),
    ("bench_ngram_cache", ["--mode", "hashed", "--buckets", "1000"], 2, ["--buckets 1000", "power of two"]),
    ("bench_ngram_cache", ["--buckets", "0"], 2, ["--buckets"]),
    ("bench_ngram_cache", ["--min-count", "0"], 2, ["--min-count"]),
    ("bench_ngram_cache", ["--batch-positions", "0"], 2, ["--batch-positions"]),
    ("bench_ngram_cache", ["--world", "0"], 2, ["--world"]),
    ("bench_ngram_cache", ["--edge-chunks", "0"], 2, ["--edge-chunks"]),
    ("bench_ngram_cache", ["--log-every", "-1"], 2, ["--log-every"]),
    ("bench_ngram_cache", ["--seed", "-1"], 2, ["--seed"]),
    ("bench_ngram_cache", ["--device", "gpu"], 2, ["--device", "invalid choice"]),
    ("bench_ngram_cache", ["--tokens", "10", "--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("bench_ngram_mixer", ["--targets", "0"], 2, ["--targets", ">= 1"]),
    ("bench_ngram_mixer", ["--steps", "-1"], 2, ["--steps"]),
    ("bench_ngram_mixer", ["--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("bench_ngram_mixer", ["--data", "{d}/missing", "--tokenizer", "{d}/t.model"], 2, ["no dataset", "--bench"]),
    ("bench_ngram_mixer", ["--data", "{d}/missing", "--tokenizer", "{d}/t.model", "--bench", "{d}"], 2,
     ["english_mix_v1.jsonl.xz"]),
    ("bench_ngram_mixer", ["--data", "{d}", "--tokenizer", "{d}/a.txt", "--artifact", "{d}/missing"], 2,
     ["--artifact", "no such file"]),
    ("bench_train", ["--steps", "0"], 2, ["--steps", ">= 1"]),
    ("bench_train", ["--warmup", "-1"], 2, ["--warmup", ">= 0"]),
    ("bench_train", ["--peak-flops", "nan"], 2, ["--peak-flops", "finite number > 0"]),
    ("bench_train", ["--peak-flops", "-1e12"], 2, ["--peak-flops"]),
    ("bench_train", ["--peak-flops", "0"], 2, ["--peak-flops"]),
    ("bench_train", ["--peak-flops", "inf"], 2, ["--peak-flops"]),
    ("bench_train", ["--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("preflight", ["--collective-timeout", "0"], 2, ["--collective-timeout", "(0, 1e9]"]),
    ("preflight", ["--collective-timeout", "nan"], 2, ["--collective-timeout"]),
    ("preflight", ["--timeout", "-1"], 2, ["--timeout"]),
    ("preflight", ["--timeout", "1e300"], 2, ["--timeout", "(0, 1e9]"]),
    ("preflight", ["--peak-flops", "nan"], 2, ["--peak-flops"]),
    ("preflight", ["--peak-flops", "-5"], 2, ["--peak-flops"]),
    ("preflight", ["--steps", "0"], 2, ["--steps"]),
    ("preflight", ["--warmup", "-1"], 2, ["--warmup"]),
    ("preflight", ["--eval-tokens", "0"], 2, ["--eval-tokens"]),
    ("preflight", ["--collective-iters", "0"], 2, ["--collective-iters"]),
    ("preflight", ["--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("bench_gptq", ["--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("compress", ["encode", "--artifact", "{d}/a.txt", "--threads", "0", "-o", "{d}/x.pgc"], 2, ["--threads"]),
    ("compress", ["encode", "--artifact", "{d}/a.txt", "--tokens", "0", "-o", "{d}/x.pgc"], 2, ["--tokens"]),
    ("compress", ["encode", "--artifact", "{d}/a.txt", "-o", "{d}/a.txt"], 2, ["-o", "is the input"]),
    ("compress", ["encode", "--artifact", "{d}/a.txt", "-o", "{d}/x.pgc", "--json", "{d}/link.txt"], 2,
     ["--json", "is the input"]),
    ("compress", ["decode", "--artifact", "{d}/a.txt", "{d}/b.txt", "-o", "{d}/b.txt"], 2, ["-o", "is the input"]),
    ("compress", ["decode", "--artifact", "{d}/a.txt", "{d}/missing.pgc", "-o", "{d}/y.txt"], 2, ["cannot read"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--threads", "0"], 2, ["--threads"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--shard-tokens", "0"], 2, ["--shard-tokens"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--shard-tokens", str(2**31)], 2, ["--shard-tokens"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--val-docs", "0"], 2, ["--val-docs"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--vocab-size", "100"], 2, ["--vocab-size"]),
    ("make_dataset", ["--input", "{d}/missing", "--name", "x", "--out-dir", "{d}/out"], 2, ["no such file"]),
    ("make_dataset", ["--input", "{d}/a.txt", "--name", "x", "--out-dir", "{d}/a.txt/out"], 2, ["a.txt"]),
    ("cached_challenge_fineweb", ["--train-shards", "-1"], 2, ["--train-shards"]),
    ("cached_challenge_fineweb", ["--variant", "1024"], 2, ["--variant"]),
    ("bench_windows", ["--targets", "0"], 2, ["--targets", ">= 1"]),
    ("bench_windows", ["--rank", "8", "--world", "8"], 2, ["--rank < --world"]),
    ("bench_windows", ["--stride", "4096"], 2, ["--stride <= --seq-len"]),
    ("bench_windows", ["--json", "{d}/missing/x.json"], 2, ["--json"]),
    ("bench_codec", ["--synthetic", "--synthetic-std", "nan"], 2, ["--synthetic-std", "finite number > 0"]),
    ("bench_codec", ["--synthetic", "--threads", "0"], 2, ["--threads"]),
    ("bench_codec", ["--artifact", "{d}/missing"], 2, ["missing", "cannot read"]),
    ("bench_codec", ["--artifact", "{d}/a.txt"], 2, ["a.txt", "not an artifact"]),
    ("pack", ["pack", "{d}/missing", "-o", "{d}/p.py"], 2, ["missing"]),
    ("pack", ["shrink", "{d}/a.txt"], 2, ["mode", "invalid choice"]),
    ("install_flash_attn", ["--yes"], 2, ["unrecognized arguments: --yes"]),
]
MAINS = {"make_dataset": make_dataset.main, "cached_challenge_fineweb": cached.main,
         **{m.__name__: m.main for m in (bench_codec, bench_eval, bench_gptq, bench_ngram_cache, bench_ngram_mixer,
                                         bench_train, bench_windows, compress, install_flash_attn, make_record, pack,
                                         plot_logs, preflight, significance, summarize_logs)}}


def exit_of(main, argv) -> int:
    """A tool's exit code in-process: main's return value, or SystemExit's code (argparse, torch-style shutdown)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nanother document\n")
    (tmp_path / "b.txt").write_text("not a log\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    return tmp_path


@pytest.mark.parametrize("tool,argv,code,words", BAD_ARGUMENTS,
                         ids=[f"{t}:{' '.join(a)}" for t, a, _, _ in BAD_ARGUMENTS])
def test_every_bad_argument_is_one_error_line_and_its_exit_code(tool, argv, code, words, folder, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    before = sorted(p.name for p in folder.iterdir())
    got = exit_of(MAINS[tool], [a.replace("{d}", str(folder)) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    one_error_line(err, *words)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, not even a temporary file


@pytest.mark.parametrize("tool", sorted(MAINS))
def test_every_tool_prints_its_help_and_exits_0(tool, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert exit_of(MAINS[tool], ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and len(out.splitlines()) > 3, out  # the usage line and the options


def test_a_bad_setting_in_the_environment_is_one_error_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("NUM_HEADS", "0")
    monkeypatch.setenv("DEVICE", "cpu")
    assert exit_of(bench_train.main, ["--synthetic"]) == 2
    one_error_line(capsys.readouterr().err, "error: invalid settings: NUM_HEADS=0")


def test_toolkit_settings_text_is_what_the_script_logs_and_reads():
    import dataclasses
    import train_gpt
    h = train_gpt.Hyperparameters(run_id="x", ngram_max_order=3, ngram_order_mults=(0.5, 2.0), smeargate_enabled=False)
    assert [f"hparam {f.name}:{toolkit.format_setting(getattr(h, f.name))}"
            for f in sorted(dataclasses.fields(h), key=lambda f: f.name)] == h.log_lines()
    env = {f.name.upper(): toolkit.format_setting(getattr(h, f.name)) for f in dataclasses.fields(h)}
    assert train_gpt.Hyperparameters.from_env(env) == h  # the text of every setting reads back as the same value


@pytest.mark.parametrize("write", ["toolkit", "write_shard"])
def test_an_interrupted_atomic_write_leaves_nothing(tmp_path, monkeypatch, write):
    import numpy as np
    import train_gpt

    def interrupted(fd):
        raise toolkit.Interrupted(signal.SIGTERM)
    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(toolkit.Interrupted):
        if write == "toolkit":
            toolkit.write_file_atomic(str(tmp_path / "out.json"), b"x" * 1000)
        else:
            train_gpt.write_shard(tmp_path / "s_train_000000.bin", np.arange(1000))
    assert os.listdir(tmp_path) == []


def test_cuda_without_a_gpu_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for main, argv in ((bench_ngram_cache.main, ["--tokens", "10", "--device", "cuda"]),
                       (bench_eval.main, [*TINY_EVAL, "--tokens", "100", "--device", "cuda"])):
        assert exit_of(main, argv) == 2
        assert one_error_line(capsys.readouterr().err, "--device cpu").startswith("error: --device cuda: ")


def test_bench_eval_refuses_more_tokens_than_the_val_shards_hold(tiny_corpus, capsys):
    data, _, vocab = tiny_corpus
    argv = [*TINY_EVAL, "--vocab", str(vocab), "--val-shards", data, "--tokens", "100000000"]
    assert exit_of(bench_eval.main, argv) == 2
    line = one_error_line(capsys.readouterr().err, "< --tokens 100000000")
    assert line.startswith(f"error: --val-shards {data}: ")


NGRAM_BENCH = ["--tokens", "2000000", "--chunk", "500", "--vocab", "64", "--device", "cpu", "--log-every", "1"]


class SignalAfterFirstProgressLine:
    """sys.stderr that passes writes on and sends `signum` to this process once the first progress line is out."""

    def __init__(self, stream, signum):
        self.stream, self.signum, self.written, self.sent = stream, signum, "", False

    def write(self, text):
        self.stream.write(text)
        self.written += text
        if not self.sent and self.written.startswith("chunk 1/") and "\n" in self.written:
            self.sent = True
            os.kill(os.getpid(), self.signum)  # a real signal, handled by the tool's own handlers
        return len(text)

    def flush(self):
        self.stream.flush()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_tool_returns_128_plus_the_signal_with_one_line(tmp_path, signum, capsys, monkeypatch,
                                                                       one_thread):
    """In this process: the signal arrives while the benchmark runs; main returns 128 + signal after one line, no
    output file is left, and the handlers are restored (the process's own exit status: the slow test below)."""
    handlers = [signal.getsignal(s) for s in toolkit.INTERRUPT_SIGNALS]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stderr", SignalAfterFirstProgressLine(sys.stderr, signum))
    code = bench_ngram_cache.main([*NGRAM_BENCH, "--json", str(tmp_path / "figures.json")])
    err = capsys.readouterr().err
    assert sys.stderr.sent and err.startswith("chunk 1/"), err
    assert code == 128 + signum, err
    assert err.strip().splitlines()[1:] == [f"error: stopped by {signal.Signals(signum).name}"]
    assert list(tmp_path.iterdir()) == []  # no JSON, no temporary file
    assert [signal.getsignal(s) for s in toolkit.INTERRUPT_SIGNALS] == handlers


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_tool_exits_128_plus_the_signal_with_one_line(tmp_path, signum):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ngram_cache.py"), *NGRAM_BENCH, "--json", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    first = proc.stderr.readline()  # the first progress line: the benchmark is running
    proc.send_signal(signum)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert first.startswith("chunk 1/"), first + rest
    assert proc.returncode == 128 + signum, rest
    assert rest.strip().splitlines()[-1] == f"error: stopped by {signal.Signals(signum).name}"
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []  # no JSON, no temporary file


def test_exit_code_paths():
    def raising(exc):
        def fn():
            raise exc
        return fn
    handlers = [signal.getsignal(s) for s in toolkit.INTERRUPT_SIGNALS]
    assert toolkit.exit_code(lambda: 0) == 0
    assert toolkit.exit_code(raising(toolkit.ToolError("x"))) == toolkit.EXIT_USER == 2
    assert toolkit.exit_code(raising(OSError("disk")), user_errors=(OSError,)) == 2
    assert toolkit.exit_code(raising(toolkit.CheckFailed("x"))) == toolkit.EXIT_FAILED == 4
    assert toolkit.exit_code(raising(KeyboardInterrupt())) == 130
    assert toolkit.exit_code(raising(toolkit.Interrupted(signal.SIGTERM))) == 143
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback (Python's exit code 1)
        toolkit.exit_code(lambda: 1 / 0)
    assert [signal.getsignal(s) for s in toolkit.INTERRUPT_SIGNALS] == handlers  # restored


@pytest.mark.parametrize("other_threads", [0, 2])
def test_held_interrupts_arrive_after_the_block(other_threads):
    """Also with other threads alive (the kernel may hand the signal to any of them): the block still completes."""
    import threading
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(other_threads)]
    for t in threads:
        t.start()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with toolkit.interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append(True)
    finally:
        stop.set()
    assert done == [True]


def test_json_figures_are_valid_json_whatever_the_numbers(tmp_path, capsys):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    figures = {"ratio": math.nan, "rows": [{"bpb": math.inf}, {"bpb": 1.5}], "n": 2}
    logparse.emit("text", figures, str(tmp_path / "f.json"))
    assert strict((tmp_path / "f.json").read_text()) == {"ratio": None, "rows": [{"bpb": None}, {"bpb": 1.5}], "n": 2}
    assert capsys.readouterr().out == "text\n"
    logparse.emit("text", figures, "-")
    assert strict(capsys.readouterr().out)["ratio"] is None


def test_readme_lists_every_exit_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## When something is wrong"):]
    section = section[:section.index("\n## ", 3)]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    for code in ("0", "1", "2", "3", "4", "130 / 143"):
        assert code in rows, rows
