"""Whole-script behaviour on bad input: one line, exit code 2 (130/143 for signals), nothing lost or left behind.
Run: python3 -m pytest tests/test_user_errors.py"""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, run_script, tiny_run_env


def assert_one_line_error(out, *words):
    """Exit 2, exactly one `error:` line naming `words` on stderr, no traceback."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def left_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("settings, words", [
    ({"NUM_HEADS": "0"}, ["NUM_HEADS=0 must be > 0"]),
    ({"ITERATIONS": "0"}, ["ITERATIONS=0"]),
    ({"MAX_WALLCLOCK_SECONDS": "-5"}, ["MAX_WALLCLOCK_SECONDS"]),
    ({"NGRAM_MAX_ORDR": "5"}, ["did you mean NGRAM_MAX_ORDER"]),
    ({"RUN_ID": "../../escape"}, ["RUN_ID"]),
    ({"TRAIN_BATCH_TOKENS": "1000"}, ["TRAIN_BATCH_TOKENS=1000", "use TRAIN_BATCH_TOKENS="]),
])
def test_bad_settings_fail_in_one_line_before_anything_is_written(tiny_corpus, tmp_path, settings, words):
    env = tiny_run_env(tiny_corpus, tmp_path, **settings)
    assert_one_line_error(run_script(env), *words)
    assert left_files(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "under_a_file", "read_only"])
def test_unusable_artifact_path_is_found_before_training(tiny_corpus, tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    path = {"folder": tmp_path, "under_a_file": tmp_path / "a_file" / "model.ptz",
            "read_only": Path("/proc/model.int6.ptz")}[where]
    env = tiny_run_env(tiny_corpus, tmp_path, ARTIFACT_PATH=str(path))
    assert_one_line_error(run_script(env), "ARTIFACT_PATH=")
    assert left_files(tmp_path) == ["a_file", "logs"]  # the (empty) log folder was checked first; no log, no model


@pytest.mark.slow
def test_unwritable_log_dir_and_bad_data(tiny_corpus, tmp_path):
    (tmp_path / "a_file").write_text("x")
    env = tiny_run_env(tiny_corpus, tmp_path, LOG_DIR=str(tmp_path / "a_file" / "logs"))
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert_one_line_error(out, "LOG_DIR=")
    not_a_model = tmp_path / "tok.model"
    not_a_model.write_bytes(b"this is not a sentencepiece model")
    env = tiny_run_env(tiny_corpus, tmp_path, TOKENIZER_PATH=str(not_a_model))
    assert_one_line_error(run_script(env), str(not_a_model), "not a SentencePiece model")
    log = (tmp_path / "logs" / "e2e.txt").read_text().splitlines()
    assert log[-1].startswith("run_failed reason:user_error detail:tokenizer ")


@pytest.mark.slow
def test_reused_run_id_never_appends_to_the_old_log(tiny_corpus, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "e2e.txt").write_text("an earlier run\n")
    env = tiny_run_env(tiny_corpus, tmp_path)
    assert_one_line_error(run_script(env), "RUN_ID=e2e", "already exists")
    assert (logs / "e2e.txt").read_text() == "an earlier run\n"
    assert left_files(tmp_path) == ["logs", "logs/e2e.txt"]


@pytest.mark.slow
def test_torchrun_user_error_is_one_line_from_rank_0(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, NUM_KV_HEADS="3")
    out = run_script(env, nproc=2)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert len(re.findall(r"^error: invalid settings: .*NUM_KV_HEADS=3", text, re.M)) == 1, text[-3000:]
    assert 'train_gpt.py", line' not in text  # torchrun reports the exit code; our ranks print no traceback


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_the_run_in_one_line_and_leaves_no_temporary_files(tiny_corpus, tmp_path, signum, code):
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="100000", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "e2e.txt"
    deadline = time.time() + 300
    trained = re.compile(r"^step:\d+/\d+ train_loss:", re.M)  # (the log also holds the source text)
    while time.time() < deadline and not (log.exists() and trained.search(log.read_text())):
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    name = signal.Signals(signum).name
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [f"error: stopped by {name}"]
    assert "Traceback" not in stderr
    assert log.read_text().splitlines()[-1] == f"run_failed reason:interrupted detail:stopped by {name}"
    assert not [p for p in left_files(tmp_path) if ".tmp" in p]


def test_interrupted_atomic_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(fd):
        raise tg.RunInterrupted(signal.SIGTERM)

    monkeypatch.setattr(tg.os, "fsync", interrupted)
    with pytest.raises(tg.RunInterrupted):
        tg.write_file_atomic(str(tmp_path / "model.ptz"), b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_eval_only_tokenizer_of_another_vocabulary_points_at_the_tokenizer(tiny_corpus, tmp_path):
    _, tok, vocab = tiny_corpus
    h = tg.Hyperparameters(tokenizer_path=tok, vocab_size=vocab + 64, eval_only=True, artifact_path="a.ptz")
    with pytest.raises(tg.UserError) as e:  # VOCAB_SIZE comes from the artifact: setting it would be refused
        tg.load_tokenizer(h)
    assert f"has {vocab} pieces" in str(e.value) and "set TOKENIZER_PATH to the tokenizer the model in a.ptz" in str(
        e.value) and "set VOCAB_SIZE" not in str(e.value)
    with pytest.raises(tg.UserError, match="or set VOCAB_SIZE"):  # when training, VOCAB_SIZE is the user's
        tg.load_tokenizer(dataclasses.replace(h, eval_only=False))
