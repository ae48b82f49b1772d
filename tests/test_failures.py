"""Failed runs: divergence, non-finite weights or scores, a failed audit, a failed write. Each is one `error:` line,
`run_failed reason:<reason>` and exit code 4 (never a traceback, never a score), and trained weights survive.
Run: python3 -m pytest tests/test_failures.py"""
import errno
import hashlib
import os
import re
import resource
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import RT1, ROOT, random_stream, tiny_model, tiny_run_env, unit_tables


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


def test_nonfinite_artifact_weights_fail_before_any_evaluation(tiny, tmp_path, monkeypatch):
    h = tiny(vocab_size=64, artifact_path=str(tmp_path / "m.ptz"))
    state = tiny_model(h).state_dict()
    state["skip_weights"][0, 0] = float("inf")
    tg.write_file_atomic(h.artifact_path, tg.pack_artifact(state, h)[0])
    art = tg.load_artifact(h.artifact_path)
    monkeypatch.setattr(tg, "roundtrip_eval", lambda *a: pytest.fail("evaluated non-finite weights"))
    with pytest.raises(tg.RunFailed, match=f"the weights in {art.path} hold NaN or inf in 1 tensors") as e:
        tg.evaluate_artifact(art, h, RT1, tg.ValData(random_stream(600, 64), unit_tables(64)))
    assert e.value.reason == "nonfinite_weights"


def test_divergence_and_an_empty_swa_are_failed_runs(capsys):
    with pytest.raises(tg.RunFailed, match="training diverged: non-finite loss at step 7") as e:
        tg.stop_on_nonfinite(torch.tensor(float("nan")), 7)
    assert e.value.reason == "diverged" and "nonfinite_loss step:7 train_loss:nan" in capsys.readouterr().out
    with pytest.raises(tg.RunFailed, match="SWA has no snapshots") as e:
        tg.SWA().state()
    assert e.value.reason == "no_swa_snapshots"


@pytest.mark.parametrize("error, code, reason", [
    (tg.RunFailed("diverged", "training diverged: non-finite loss at step 3"), 4, "diverged"),
    (tg.UserError("VOCAB_SIZE is wrong"), 2, "user_error"),
])
def test_main_maps_failures_to_one_line_and_their_exit_code(monkeypatch, tmp_path, capsys, error, code, reason):
    def failing_run():
        raise error
    monkeypatch.setattr(tg, "run", failing_run)
    monkeypatch.setattr(tg, "_LOG_FILE", [str(tmp_path / "run.txt")])
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        tg.main()
    assert e.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"
    assert (tmp_path / "run.txt").read_text() == f"run_failed reason:{reason} detail:{error}\n"


def test_a_failed_log_write_goes_on_on_the_console_then_fails_the_run(monkeypatch, tmp_path, capsys):
    path = str(tmp_path / "gone" / "run.txt")  # its folder does not exist: every append fails (ENOENT)
    monkeypatch.setattr(tg, "_LOG_FILE", [path])
    monkeypatch.setattr(tg, "_LOG_FAILURE", [])
    tg.log_event("step:1/2", train_loss="1.0")
    tg.log_event("step:2/2", train_loss="0.5")  # the run goes on, on the console
    out = capsys.readouterr().out.splitlines()
    assert out == ["step:1/2 train_loss:1.0", f"log_write_failed path:{path} errno:ENOENT", "step:2/2 train_loss:0.5"]
    with pytest.raises(tg.RunFailed) as e:
        tg.raise_if_log_failed(RT1)
    assert e.value.reason == "write_failed"
    assert str(e.value).startswith(f"cannot write the log {path} (ENOENT: No such file or directory)")


def test_a_name_that_is_not_utf8_cannot_cut_the_log(monkeypatch, tmp_path, capsys):
    path = tmp_path / "run.txt"
    monkeypatch.setattr(tg, "_LOG_FILE", [str(path)])
    tg.log_event("env_ignored", name=os.fsdecode(b"TRAIN_\xff"))
    tg.log_event("next", value=1)
    assert path.read_text().splitlines() == ["env_ignored name:TRAIN_\\udcff", "next value:1"]


def set_file_size_limit(limit_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.slow
def test_a_file_size_limit_on_the_log_fails_before_training(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, preexec_fn=set_file_size_limit(32_000))  # the log holds the source
    assert out.returncode == 4, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    log = tmp_path / "logs" / "e2e.txt"
    assert errors == [f"error: cannot write the log {log} (EFBIG: File too large); its lines from then on are only "
                      "on the console"] and "Traceback" not in out.stderr
    assert f"log_write_failed path:{log} errno:EFBIG" in out.stdout
    assert not re.search(r"^step:\d+/\d+ train_loss:", out.stdout, re.M)  # stopped before step 1
    assert not os.path.exists(env["ARTIFACT_PATH"])


BREAK_LOG_AFTER_TRAINING = """import sys
sys.path.insert(0, {root!r})
import train_gpt as tg
real_train = tg.train
def train_then_lose_the_log(*args, **kwargs):
    result = real_train(*args, **kwargs)
    tg._LOG_FILE[0] = {gone!r}  # as if the disk filled up: every later append fails
    return result
tg.train = train_then_lose_the_log
tg.main()
"""


@pytest.mark.slow
def test_a_log_that_fails_after_training_keeps_the_artifact_and_fails_the_run(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="4", VAL_LOSS_EVERY="0", NGRAM_ENABLED="0")
    gone = str(tmp_path / "gone" / "e2e.txt")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(BREAK_LOG_AFTER_TRAINING.format(root=str(ROOT), gone=gone))
    out = subprocess.run([sys.executable, str(wrapper)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 4, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: cannot write the log {gone} ({errno.errorcode[errno.ENOENT]}: No such file or directory); its "
        "lines from then on are only on the console"] and "Traceback" not in out.stderr
    art = tg.load_artifact(env["ARTIFACT_PATH"])  # the trained weights were exported and scored all the same
    assert f"artifact path:{art.path} sha256:{hashlib.sha256(art.blob).hexdigest()} " in out.stdout
    assert re.search(r"^final_int6_zstd_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out.stdout, re.M)


def test_main_gives_the_callers_signal_handlers_back(monkeypatch, tmp_path):
    """main() installs its SIGINT/SIGTERM handlers for the run only: an in-process caller keeps its own."""
    import signal
    mine = {s: (lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: signal.signal(s, h) for s, h in mine.items()}
    try:
        monkeypatch.setattr(tg, "run", lambda: 0)
        tg.main()
        assert {s: signal.getsignal(s) for s in mine} == mine
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
