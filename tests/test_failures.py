"""Failed runs: divergence, non-finite weights or scores, a failed audit, a failed write. Each is one `error:` line,
`run_failed reason:<reason>` and exit code 4 (never a traceback, never a score), and trained weights survive.
Run: python3 -m pytest tests/test_failures.py"""
import errno
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import RT1, ROOT, main_in_process, one_error_line, random_stream, tiny_model, tiny_run_env, unit_tables


class NaNModel(torch.nn.Module):
    """Logits that are all NaN (what weights with a NaN give)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dummy = vocab, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.full((*x.shape, self.vocab), float("nan")) + 0 * self.dummy


@pytest.mark.parametrize("ngram", [False, True])
def test_a_nonfinite_score_fails_the_run_and_reports_no_score(tiny, capsys, ngram):
    h = tiny(vocab_size=64, ngram_enabled=ngram)
    val = tg.ValData(random_stream(600, 64), unit_tables(64))
    with pytest.raises(tg.RunFailed, match=r"non-finite score \(model val_loss:nan val_bpb:nan") as e:
        tg.roundtrip_eval(NaNModel(64), val, h, RT1)
    assert e.value.reason == "nonfinite_score"
    assert "_exact " not in capsys.readouterr().out  # no score line for a grep to pick up


def test_nonfinite_artifact_weights_fail_before_any_evaluation(tiny_corpus, tmp_path, monkeypatch, capsys):
    env = tiny_run_env(tiny_corpus, tmp_path, EVAL_ONLY="1")
    h = tg.Hyperparameters.from_env(env)
    state = tiny_model(h).state_dict()
    state["skip_weights"][0, 0] = float("inf")
    Path(env["ARTIFACT_PATH"]).write_bytes(tg.pack_artifact(state, h)[0])
    monkeypatch.setattr(tg, "roundtrip_eval", lambda *a: pytest.fail("evaluated non-finite weights"))
    assert main_in_process(env, monkeypatch, tmp_path) == 4
    message = f"the weights in {env['ARTIFACT_PATH']} hold NaN or inf in 1 tensors"
    assert capsys.readouterr().err.startswith(f"error: {message}")
    log = (tmp_path / "logs" / "e2e.txt").read_text().splitlines()
    assert log[-1].startswith(f"run_failed reason:nonfinite_weights detail:{message}")
    assert not any(re.match(r"\w+_exact val_loss:", line) for line in log)  # no score (the log holds the source)


def fail_at_the_tokenizer(monkeypatch, error: Exception):
    """load_tokenizer raises `error`: after the log and its header, before training."""
    def failing(h):
        raise error
    monkeypatch.setattr(tg, "load_tokenizer", failing)


def lose_the_log_folder_once_created(monkeypatch, logs):
    """As if the disk went away right after the log was created: every append fails (ENOENT)."""
    real = tg.with_attention  # the step of the run that follows the log's creation
    monkeypatch.setattr(tg, "with_attention", lambda *a, **k: shutil.rmtree(logs) or real(*a, **k))


def nan_loss_at_step(monkeypatch, nan_at_step: int):
    """Wraps the public train_step: the loss of step `nan_at_step` (1-based) becomes NaN, as a diverged step's."""
    real = tg.train_step

    def step(model, opt, loader, h, rt, i, scale):
        loss = real(model, opt, loader, h, rt, i, scale)
        return loss * float("nan") if i + 1 == nan_at_step else loss
    monkeypatch.setattr(tg, "train_step", step)


def test_divergence_and_an_empty_swa_are_failed_runs(tiny, tiny_corpus, monkeypatch, capsys):
    data, _, vocab = tiny_corpus
    h = tiny(data_path=data, vocab_size=vocab, iterations=10)
    model = tiny_model(h)
    nan_loss_at_step(monkeypatch, 7)
    with pytest.raises(tg.RunFailed, match="training diverged: non-finite loss at step 7") as e:
        tg.train(model, model, tg.build_optimizers(model, h, RT1), None, h, RT1)
    out = capsys.readouterr().out
    assert e.value.reason == "diverged" and "nonfinite_loss step:7 train_loss:nan" in out
    assert "step:6/10 train_loss:" in out and "step:7/10 train_loss:" not in out  # stopped at the step itself
    with pytest.raises(tg.RunFailed, match="SWA has no snapshots") as e:
        tg.SWA().state()
    assert e.value.reason == "no_swa_snapshots"


@pytest.mark.parametrize("error, code, reason", [
    (tg.RunFailed("diverged", "training diverged: non-finite loss at step 3"), 4, "diverged"),
    (tg.UserError("VOCAB_SIZE is wrong"), 2, "user_error"),
])
def test_main_maps_failures_to_one_line_and_their_exit_code(tiny_corpus, monkeypatch, tmp_path, capsys, error, code,
                                                           reason):
    fail_at_the_tokenizer(monkeypatch, error)
    assert main_in_process(tiny_run_env(tiny_corpus, tmp_path), monkeypatch, tmp_path) == code
    assert capsys.readouterr().err == f"error: {error}\n"
    log = (tmp_path / "logs" / "e2e.txt").read_text().splitlines()
    assert log[-1] == f"run_failed reason:{reason} detail:{error}"


def test_a_failed_log_write_goes_on_on_the_console_then_fails_the_run(tiny_corpus, monkeypatch, tmp_path, capsys):
    logs = tmp_path / "logs"
    lose_the_log_folder_once_created(monkeypatch, logs)
    env = tiny_run_env(tiny_corpus, tmp_path)
    assert main_in_process(env, monkeypatch, tmp_path) == 4
    path = str(logs / "e2e.txt")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    failed = lines.index(f"log_write_failed path:{path} errno:ENOENT")
    assert lines[failed - 1].startswith("hparam ") and lines[failed + 1].startswith("hparam ")  # it goes on
    assert lines.count(f"log_write_failed path:{path} errno:ENOENT") == 1
    assert err == (f"error: cannot write the log {path} (ENOENT: No such file or directory); its lines from then on "
                   "are only on the console\n")
    assert not re.search(r"^step:\d+/\d+ train_loss:", out, re.M) and not os.path.exists(env["ARTIFACT_PATH"])


def test_a_name_that_is_not_utf8_cannot_cut_the_log(tiny_corpus, monkeypatch, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, **{os.fsdecode(b"TRAIN_\xff"): "1"})
    fail_at_the_tokenizer(monkeypatch, tg.UserError("stop here"))
    assert main_in_process(env, monkeypatch, tmp_path) == 2
    log = (tmp_path / "logs" / "e2e.txt").read_text(encoding="utf-8").splitlines()  # whole, and valid UTF-8
    i = log.index("env_ignored name:TRAIN_\\udcff")
    assert log[i + 1].startswith("hparam ") and log[-1] == "run_failed reason:user_error detail:stop here"


def test_each_run_in_one_process_starts_with_a_fresh_log(tiny_corpus, monkeypatch, tmp_path, capsys):
    """A run whose log was lost, then one stopped by a user error in its log, then one stopped before it has a log:
    each gets its own exit code and message, and no line lands in an earlier run's log."""
    logs = tmp_path / "logs"
    with monkeypatch.context() as lost:
        lose_the_log_folder_once_created(lost, logs)
        assert main_in_process(tiny_run_env(tiny_corpus, tmp_path, RUN_ID="lost"), monkeypatch, tmp_path) == 4
    fail_at_the_tokenizer(monkeypatch, tg.UserError("stop here"))
    capsys.readouterr()
    assert main_in_process(tiny_run_env(tiny_corpus, tmp_path, RUN_ID="second"), monkeypatch, tmp_path) == 2
    assert capsys.readouterr().err == "error: stop here\n"
    second = (logs / "second.txt").read_text()
    assert main_in_process(tiny_run_env(tiny_corpus, tmp_path, NUM_HEADS="0"), monkeypatch, tmp_path) == 2
    assert (logs / "second.txt").read_text() == second


def set_file_size_limit(limit_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.slow
def test_a_file_size_limit_on_the_log_fails_before_training(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, preexec_fn=set_file_size_limit(32_000))  # the log holds the source
    assert out.returncode == 4, out.stderr[-2000:]
    log = tmp_path / "logs" / "e2e.txt"
    line = one_error_line(out.stderr, alone=False)
    assert line == (f"error: cannot write the log {log} (EFBIG: File too large); its lines from then on are only on "
                    "the console")
    assert f"log_write_failed path:{log} errno:EFBIG" in out.stdout
    assert not re.search(r"^step:\d+/\d+ train_loss:", out.stdout, re.M)  # stopped before step 1
    assert not os.path.exists(env["ARTIFACT_PATH"])


def test_a_log_that_fails_after_training_keeps_the_artifact_and_fails_the_run(tiny_corpus, tmp_path, monkeypatch,
                                                                            capsys):
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="4", VAL_LOSS_EVERY="0", NGRAM_ENABLED="0")
    logs, real_train = tmp_path / "logs", tg.train

    def train_then_lose_the_log(*args, **kwargs):  # as if the disk went away: every later append fails
        result = real_train(*args, **kwargs)
        shutil.rmtree(logs)
        return result
    monkeypatch.setattr(tg, "train", train_then_lose_the_log)
    assert main_in_process(env, monkeypatch, tmp_path) == 4
    out, err = capsys.readouterr()
    gone = logs / "e2e.txt"
    assert err == (f"error: cannot write the log {gone} ({errno.errorcode[errno.ENOENT]}: No such file or directory); "
                   "its lines from then on are only on the console\n")
    art = tg.load_artifact(env["ARTIFACT_PATH"])  # the trained weights were exported and scored all the same
    assert f"artifact path:{art.path} sha256:{hashlib.sha256(art.blob).hexdigest()} " in out
    assert re.search(r"^final_int6_zstd_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out, re.M)


def test_main_gives_the_callers_signal_handlers_back(monkeypatch, tmp_path):
    """main() installs its SIGINT/SIGTERM handlers for the run only: an in-process caller keeps its own."""
    import signal
    mine = {s: (lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: signal.signal(s, h) for s, h in mine.items()}
    try:
        assert main_in_process({"NUM_HEADS": "0", "RUN_ID": "x"}, monkeypatch, tmp_path) == 2  # main's own handlers ran
        assert {s: signal.getsignal(s) for s in mine} == mine
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
