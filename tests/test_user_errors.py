"""Whole-script behaviour on bad input: one line, exit code 2 (130/143 for signals), nothing lost or left behind.
The messages of bad settings are rows of tests/test_config.py (Hyperparameters.from_env / validate); here every
problem goes through main(), in this process, and one bad setting through a real process.
Run: python3 -m pytest tests/test_user_errors.py"""
import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, main_in_process, one_error_line, run_script, tiny_run_env


def left_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def not_a_model(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"this is not a sentencepiece model")
    return str(path)


# id -> (settings (a function of tmp_path), words of the error line, files left under tmp_path). Every row but the
# first writes `a_file` first; a row that gets as far as the log ends it with `run_failed reason:user_error`.
BEFORE_TRAINING = {
    "bad_setting": (lambda d: {"NUM_HEADS": "0"}, ["NUM_HEADS=0 must be > 0"], []),
    "artifact_path_is_a_folder": (lambda d: {"ARTIFACT_PATH": str(d)}, ["ARTIFACT_PATH=", "is a folder"],
                                  ["a_file", "logs"]),  # the (empty) log folder was checked first; no log, no model
    "artifact_under_a_file": (lambda d: {"ARTIFACT_PATH": str(d / "a_file" / "model.ptz")}, ["ARTIFACT_PATH="],
                              ["a_file", "logs"]),
    "artifact_folder_read_only": (lambda d: {"ARTIFACT_PATH": "/proc/model.int6.ptz"}, ["ARTIFACT_PATH="],
                                  ["a_file", "logs"]),
    "log_dir_under_a_file": (lambda d: {"LOG_DIR": str(d / "a_file" / "logs")}, ["LOG_DIR="], ["a_file"]),
    "not_a_tokenizer": (lambda d: {"TOKENIZER_PATH": not_a_model(d)}, ["tok.model", "not a SentencePiece model"],
                        ["a_file", "logs", "logs/e2e.txt", "tok.model"]),
    "no_shards": (lambda d: {"DATA_PATH": str(d / "nothing")}, ["no val shards match", "make_dataset.py --input sample"],
                  ["a_file", "logs", "logs/e2e.txt"]),
}


@pytest.mark.parametrize("case", list(BEFORE_TRAINING))
def test_user_errors_stop_the_run_in_one_line_before_training(tiny_corpus, tmp_path, monkeypatch, capsys, case):
    settings, words, left = BEFORE_TRAINING[case]
    if case != "bad_setting":
        (tmp_path / "a_file").write_text("x")
    assert main_in_process(tiny_run_env(tiny_corpus, tmp_path, **settings(tmp_path)), monkeypatch, tmp_path) == 2
    one_error_line(capsys.readouterr().err, *words, alone=False)
    assert left_files(tmp_path) == left
    if "logs/e2e.txt" in left:  # the log ends with the same message
        last = (tmp_path / "logs" / "e2e.txt").read_text().splitlines()[-1]
        assert last.startswith("run_failed reason:user_error detail:") and all(w in last for w in words), last


def test_eval_only_settings_that_conflict_with_the_artifact_are_one_line(tiny_corpus, tmp_path, monkeypatch, capsys):
    env = tiny_run_env(tiny_corpus, tmp_path, EVAL_ONLY="1")
    artifact = Path(env["ARTIFACT_PATH"])
    artifact.write_bytes(tg.pack_artifact(tg.build_model(tg.Hyperparameters.from_env(env)).state_dict(),
                                          tg.Hyperparameters.from_env(env))[0])
    before = artifact.read_bytes()
    assert main_in_process(dict(env, XSA_LAST_N="0", NUM_LAYERS="3"), monkeypatch, tmp_path) == 2
    line = one_error_line(capsys.readouterr().err, alone=False)
    assert line.startswith("error: EVAL_ONLY: NUM_LAYERS=3 (artifact: 2), XSA_LAST_N=0 (artifact: 1) conflict"), line
    assert left_files(tmp_path) == [artifact.name] and artifact.read_bytes() == before


def test_reused_run_id_never_appends_to_the_old_log(tiny_corpus, tmp_path, monkeypatch, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "e2e.txt").write_text("an earlier run\n")
    assert main_in_process(tiny_run_env(tiny_corpus, tmp_path), monkeypatch) == 2
    one_error_line(capsys.readouterr().err, "RUN_ID=e2e", "already exists", alone=False)
    assert (logs / "e2e.txt").read_text() == "an earlier run\n"
    assert left_files(tmp_path) == ["logs", "logs/e2e.txt"]


@pytest.mark.slow
def test_a_user_error_in_a_real_process_is_one_line_exit_2_and_nothing_written(tiny_corpus, tmp_path):
    """The contract across a process boundary (what a shell sees): stderr, the exit code, the files."""
    out = run_script(tiny_run_env(tiny_corpus, tmp_path, NUM_HEADS="0"))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    one_error_line(out.stderr, "NUM_HEADS=0 must be > 0", alone=False)
    assert left_files(tmp_path) == []


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


def test_eval_only_tokenizer_of_another_vocabulary_points_at_the_tokenizer(tiny_corpus, tmp_path):
    _, tok, vocab = tiny_corpus
    h = tg.Hyperparameters(tokenizer_path=tok, vocab_size=vocab + 64, eval_only=True, artifact_path="a.ptz")
    with pytest.raises(tg.UserError) as e:  # VOCAB_SIZE comes from the artifact: setting it would be refused
        tg.load_tokenizer(h)
    assert f"has {vocab} pieces" in str(e.value) and "set TOKENIZER_PATH to the tokenizer the model in a.ptz" in str(
        e.value) and "set VOCAB_SIZE" not in str(e.value)
    with pytest.raises(tg.UserError, match="or set VOCAB_SIZE"):  # when training, VOCAB_SIZE is the user's
        tg.load_tokenizer(dataclasses.replace(h, eval_only=False))
