"""Tests of tools/ (log parser, summary, significance test, plots, record folder) on synthetic logs."""

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import logparse
import make_record
import plot_logs
import significance
import summarize_logs
import toolkit
from conftest import ROOT, one_error_line, tiny_hparams

# Settings of the real tiny run behind every log these tests read: periodic validation, diagnostic evals, late
# QAT, SWA, the exact n-gram eval and score-first TTT, on top of the suite's tiny configuration.
REAL_RUN = dict(ITERATIONS="16", WARMDOWN_ITERS="8", VAL_LOSS_EVERY="8", VAL_LAST_STEP="1", TRAIN_LOG_EVERY="4",
                VAL_MAX_TOKENS="1024", DIAG_EVAL_CANDIDATES="1", SWA_EVERY="2", QAT_TIME_FRAC="0.25",
                NGRAM_LOG_EVERY="4", NGRAM_AUDIT_POSITIONS="32", TTT_ENABLED="1", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="256",
                TTT_BATCH_SEQS="4", RUN_ID="real", SEED="1337")


def real_run_env(tiny_corpus, out_dir: Path, **extra) -> dict:
    """Environment of a run of train_gpt.py with the suite's tiny configuration (conftest.tiny_hparams)."""
    tg = sys.modules["train_gpt"]
    data, tok, vocab = tiny_corpus
    tiny, default = tiny_hparams(vocab_size=vocab), tg.Hyperparameters()
    names = [f.name for f in dataclasses.fields(tiny) if getattr(tiny, f.name) != getattr(default, f.name)]
    known = {f.name.upper() for f in dataclasses.fields(tiny)}
    env = {k: v for k, v in os.environ.items() if k not in known}
    env.update({name.upper(): toolkit.format_setting(getattr(tiny, name)) for name in names})
    env.update(DATA_PATH=data, TOKENIZER_PATH=tok, LOG_DIR=str(out_dir / "logs"), OMP_NUM_THREADS="1",
               ARTIFACT_PATH=str(out_dir / "model.int6.ptz"), **REAL_RUN)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def real_log(tiny_corpus, tmp_path_factory) -> str:
    """Text of the rank-0 log of one real tiny training run of the packed train_gpt.py, as a record runs it (about
    20 s on CPU)."""
    out_dir = tmp_path_factory.mktemp("real_run")
    env = real_run_env(tiny_corpus, out_dir)
    packed = out_dir / "train_gpt.py"
    packed.write_text(sys.modules["train_gpt"].pack_source((ROOT / "train_gpt.py").read_text(encoding="utf-8")))
    done = subprocess.run([sys.executable, str(packed)], env=env, cwd=out_dir, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (out_dir / "logs" / "real.txt").read_text(encoding="utf-8")


# per-seed scores written into copies of the real log: round-trip loss/bpb and n-gram loss/bpb
SEEDS = {1337: dict(rt_loss=1.90443578, rt_bpb=1.12791767, ng_loss=0.47961142, ng_bpb=0.28405290),
         42: dict(rt_loss=1.90393001, rt_bpb=1.12761002, ng_loss=0.47950011, ng_bpb=0.28399001),
         2024: dict(rt_loss=1.90450123, rt_bpb=1.12795511, ng_loss=0.47955555, ng_bpb=0.28402222)}


def _set_score(text: str, event: str, loss: float, bpb: float) -> str:
    """Replace the scores of `<event>` and `<event>_exact` in log text."""
    text = re.sub(rf"^{event} val_loss:\S+ val_bpb:\S+", f"{event} val_loss:{loss:.4f} val_bpb:{bpb:.4f}", text, flags=re.M)
    return re.sub(rf"^{event}_exact val_loss:\S+ val_bpb:\S+$", f"{event}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
                  text, flags=re.M)


def seed_log(real_log: str, seed: int, sha=None, hashed=False, truncate_at=None, hparams=None) -> str:
    """The real log as if run with another seed (scores from SEEDS), another script's sha256, the hashed n-gram
    mode, other settings (hparams), or cut before the first event line starting with `truncate_at`."""
    s = SEEDS[seed]
    text = real_log.replace("hparam seed:1337\n", f"hparam seed:{seed}\n").replace("hparam run_id:real\n",
                                                                                    f"hparam run_id:run{seed}\n")
    for key, value in (hparams or {}).items():
        text = re.sub(rf"^hparam {key}:.*$", f"hparam {key}:{value}", text, flags=re.M)
    for event in ("final_int6_zstd_roundtrip", "final_int8_zlib_roundtrip"):
        text = _set_score(text, event, s["rt_loss"], s["rt_bpb"])
    text = _set_score(text, "ngram_eval", s["ng_loss"], s["ng_bpb"])
    if sha is not None:
        text = re.sub(r"code_sha256:\S+", f"code_sha256:{sha}", text)
    if hashed:
        text = re.sub(r"^ngram_audit .*\n", "", text.replace("ngram_eval", "ngram_hashed_unnormalized"), flags=re.M)
        text = text.replace("hparam ngram_mode:exact", "hparam ngram_mode:hashed").replace("mode:exact", "mode:hashed")
    if truncate_at is not None:
        head, sep, events = text.partition("=" * 100 + "\n")
        text = head + sep + events[:events.index("\n" + truncate_at) + 1]
    return text


def write_logs(tmp_path, real_log, seeds=(1337, 42, 2024), **kw):
    """Write one log per seed into tmp_path/logs and return their paths."""
    d = tmp_path / "logs"
    d.mkdir(exist_ok=True)
    paths = []
    for seed in seeds:
        p = d / f"run{seed}.txt"
        p.write_text(seed_log(real_log, seed, **kw))
        paths.append(p)
    return paths


def real_script(tmp_path):
    """A copy of the readable train_gpt.py whose packed form is the script behind the real log; returns (path,
    packed bytes)."""
    data = (ROOT / "train_gpt.py").read_bytes()
    path = tmp_path / "train_gpt.py"
    path.write_bytes(data)
    return path, sys.modules["train_gpt"].pack_source(data.decode("utf-8")).encode("utf-8")


def record_args(tmp_path, script, logs, *extra):
    return ["--name", "ExactNgram", "--date", "2026-03-30", "--author", "Ann", "--github-id", "ann",
            "--blurb", "exact cache", "--script", str(script), "--out", str(tmp_path / "records"), *extra,
            *map(str, logs)]


# ------------------------------------------------------------------ parser

@pytest.mark.slow  # needs the real run (real_log)
def test_every_event_line_of_a_real_run_is_parsed_and_no_source_line(real_log):
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    before, after = real_log.split(source + "\n" + "=" * 100 + "\n")
    event_lines = [ln for ln in (before + after).splitlines() if ln.strip()]
    run = logparse.parse_text(real_log)
    assert sum(len(found) for found in run.events.values()) == len(event_lines)
    assert run.unparsed == [ln for ln in source.splitlines() if ln.strip()] + ["=" * 100]
    assert logparse.require_complete(run) is run


@pytest.mark.slow  # needs the real run (real_log)
def test_fields_the_tools_report_are_found_in_a_real_log(real_log, tmp_path):
    run = logparse.parse_text(real_log, "real.txt")
    last = re.findall(r"^step:(\d+)/16 .*step_avg:([\d.]+)ms$", real_log, re.M)[-1]
    assert run.seed == 1337 and run.run_id == "real" and run.world_size == 1 and run.hparams["ttt_enabled"] == "1"
    assert run.steps == int(last[0]) == 16 and run.step_avg_ms == float(last[1])
    assert run.tokens_per_s == pytest.approx(256 / (float(last[1]) / 1000))
    assert len(run.step_events("train_step")) >= 5 and len(run.step_events("val_step")) == 2
    row = summarize_logs.summarize([run])["rows"][0]
    assert [k for k, v in row.items() if v is None] == ["ngram_hashed_bpb"]  # the run used the exact cache
    assert row["peak_memory_mib"] > 0 and row["ttt_bpb"] == run.event("legal_ttt_exact")["val_bpb"]
    checklist = make_record.compliance([run])
    assert [item["ok"] for item in checklist] == [True, True, True, False, True, True]  # VAL_MAX_TOKENS caps it
    assert "(no " not in json.dumps(checklist)
    assert {m: significance.metric_values([run], m) for m in significance.METRICS}
    assert run.event("qat_start")["step"] > 0 and run.event("swa_start") and run.event("ngram_audit")["positions"] == 32
    assert run.event("serialized")["model_bytes"] + run.code_bytes == run.total_bytes == run.event("artifact")["total_bytes"]


def test_generic_line_form():
    assert logparse.match_line("step:7/20 train_loss:3.1000 train_time:622ms step_avg:88.84ms") == ("step", {
        "step": 7, "step_of": 20, "train_loss": 3.1, "train_time_ms": 622.0, "step_avg_ms": 88.84})
    assert logparse.match_line("hparam ngram_mode:exact") == ("hparam", {"key": "ngram_mode", "value": "exact"})
    assert logparse.match_line("Total submission int6+zstd: 15854191 bytes") == ("total_submission", {
        "total_bytes": 15854191})
    assert logparse.match_line("stopping_early: wallclock_cap train_time:600062ms step:6774/20000")[1] == {
        "reason": "wallclock_cap", "train_time_ms": 600062.0, "step": 6774, "step_of": 20000}
    assert logparse.match_line("run_failed reason:user_error detail:DATA_PATH=/x: no shards; fix it") == (
        "run_failed", {"reason": "user_error", "detail": "DATA_PATH=/x: no shards; fix it"})
    for line in ('    log0(f"step:{step}/{h.iterations} val_loss:{v:.4f}")', "import os", "pass", "x = {'a':1}",
                 "def main() -> None:", "=" * 100, "  final_int6_zstd_roundtrip_exact val_loss:1.0 val_bpb:1.0"):
        assert logparse.match_line(line) is None, line


# ------------------------------------------------------------------ summarize_logs

@pytest.mark.slow  # needs the real run (real_log)
def test_summarize_numbers_mean_std_and_json(tmp_path, capsys, real_log):
    paths = write_logs(tmp_path, real_log)
    run = logparse.parse_text(real_log)
    out = tmp_path / "summary.json"
    assert summarize_logs.main([*map(str, paths), "--json", str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | seed | steps |") and "| mean |" in table and "| std |" in table
    data = json.loads(out.read_text())
    assert data["n"] == 3 and [r["seed"] for r in data["rows"]] == [1337, 42, 2024]
    rt = [SEEDS[s]["rt_bpb"] for s in (1337, 42, 2024)]
    assert data["mean"]["roundtrip_bpb"] == pytest.approx(sum(rt) / 3)
    mean = sum(rt) / 3
    assert data["std"]["roundtrip_bpb"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in rt) / 2))
    assert data["mean"]["steps"] == 16 and data["std"]["steps"] == 0
    assert data["rows"][1]["tokens_per_s"] == pytest.approx(run.tokens_per_s)
    assert data["rows"][0]["ngram_bpb"] == SEEDS[1337]["ng_bpb"] and data["rows"][0]["total_bytes"] == run.total_bytes
    assert data["rows"][0]["post_training_s"] == pytest.approx(run.post_training_ms / 1000)


@pytest.mark.slow  # needs the real run (real_log)
def test_summarize_text_table_single_log(tmp_path, capsys, real_log):
    (path,) = write_logs(tmp_path, real_log, seeds=(42,))
    assert summarize_logs.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "run42" in out and "1.127610" in out and "mean" not in out


@pytest.mark.slow  # needs the real run (real_log)
@pytest.mark.parametrize("kind", ["truncated", "killed_in_ngram", "failed", "foreign"])
def test_summarize_skips_unusable_logs_with_a_warning(tmp_path, capsys, kind, real_log):
    good = write_logs(tmp_path, real_log, seeds=(1337, 2024))
    bad = tmp_path / f"{kind}.txt"
    bad.write_text({"truncated": seed_log(real_log, 42, truncate_at="final_int6_zstd_roundtrip"),
                    "killed_in_ngram": seed_log(real_log, 42, truncate_at="ngram_eval "),
                    "failed": seed_log(real_log, 42) + "run_failed reason:artifact_over_limit limit:16000000\n",
                    "foreign": "import torch\nprint('hello')\nstep:1/10 train_loss:1.0 train_time:1ms step_avg:1.00ms\n"}[kind])
    assert summarize_logs.main([str(good[0]), str(bad), str(good[1]), "--json", "-"]) == 0  # not stopped by it
    captured = capsys.readouterr()
    assert [row["seed"] for row in json.loads(captured.out)["rows"]] == [1337, 2024]
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and str(bad) in warning[0]
    assert {"truncated": "truncated", "killed_in_ngram": "n-gram", "failed": "run failed",
            "foreign": "no 'hparam"}[kind] in warning[0]
    assert summarize_logs.main([str(bad)]) == 2 and "error: none of the 1 log(s)" in capsys.readouterr().err


@pytest.mark.slow  # needs the real run (real_log)
def test_json_option_means_the_same_in_every_tool(tmp_path, capsys, real_log):
    paths = list(map(str, write_logs(tmp_path, real_log)))
    commands = {"summarize": (summarize_logs.main, paths), "significance": (significance.main, [
        "--baseline", "1.92", "--logs", *paths])}
    for name, (main, args) in commands.items():
        assert main([*args, "--json", "-"]) == 0, name
        captured = capsys.readouterr()
        data = json.loads(captured.out)  # '-': only JSON on stdout, the text on stderr
        assert captured.err.strip(), name
        out = tmp_path / f"{name}.json"
        assert main([*args, "--json", str(out)]) == 0
        assert json.loads(out.read_text()) == data and capsys.readouterr().out.strip() == captured.err.strip()
        assert main([*args, "--json", str(tmp_path / "missing" / "x.json")]) == 2  # user error: exit 2, one line
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --json") and not list((tmp_path / "missing").glob("*")) if (
            tmp_path / "missing").exists() else err[-1].startswith("error: --json")
    bench = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_ngram_cache.py"), "--tokens", "3000",
                            "--chunk", "1000", "--device", "cpu", "--json", "-"], capture_output=True, text=True,
                           timeout=120)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["tokens"] == 3000 and "tokens_per_s:" in bench.stderr


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_refuses_incomplete_logs_unless_allowed(tmp_path, capsys, real_log):
    script, _ = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42))
    killed = tmp_path / "logs" / "run2024.txt"
    killed.write_text(seed_log(real_log, 2024, truncate_at="ngram_eval "))  # killed during the n-gram eval
    assert make_record.main(record_args(tmp_path, script, [*logs, killed])) == 2
    err = capsys.readouterr().err
    assert str(killed) in err and "n-gram" in err and not (tmp_path / "records").exists()
    assert make_record.main(record_args(tmp_path, script, [*logs, killed], "--allow-incomplete")) == 0


@pytest.mark.slow  # needs the real run (real_log)
def test_summarize_allow_incomplete_and_hashed(tmp_path, capsys, real_log):
    trunc = tmp_path / "t.txt"
    trunc.write_text(seed_log(real_log, 42, truncate_at="step:12/"))
    hashed = tmp_path / "h.txt"
    hashed.write_text(seed_log(real_log, 1337, hashed=True))
    assert summarize_logs.main([str(trunc), str(hashed), "--allow-incomplete", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["roundtrip_bpb"] is None and data["rows"][0]["steps"] == 10
    assert data["rows"][1]["ngram_bpb"] is None and data["rows"][1]["ngram_hashed_bpb"] == SEEDS[1337]["ng_bpb"]


# ------------------------------------------------------------------ significance

def test_t_cdf_known_values():
    assert 1 - significance.t_cdf(3.0, 2) == pytest.approx(0.0477, abs=5e-5)
    assert significance.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy
    assert significance.t_cdf(2.228, 10) == pytest.approx(0.975, abs=1e-4)  # t-table
    assert significance.t_cdf(4.032, 5) == pytest.approx(0.995, abs=1e-4)
    assert significance.t_cdf(-6.965, 2) == pytest.approx(0.01, abs=1e-4)
    assert significance.t_cdf(0.0, 7) == 0.5


def test_t_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 9, 29, 200, 2.5):
        for t in (-40.0, -5.0, -2.0, -0.3, 0.0, 0.7, 1.5, 3.0, 12.0):
            assert significance.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-13)


def test_one_sided_ttest_figures():
    values = [1.0, 1.1, 1.2]  # mean 1.1, std 0.1
    r = significance.one_sided_ttest(values, baseline=1.3, min_improvement=0.0268)
    assert r["mean"] == pytest.approx(1.1) and r["std"] == pytest.approx(0.1) and r["df"] == 2
    assert r["t"] == pytest.approx((1.1 - 1.2732) / (0.1 / math.sqrt(3)))
    assert r["t"] == pytest.approx(-3.0, abs=1e-3) and r["p"] == pytest.approx(0.0477, abs=1e-4)
    same = significance.one_sided_ttest([1.0, 1.0], baseline=2.0, min_improvement=0.005)
    assert same["p"] == 0.0


@pytest.mark.slow  # needs the real run (real_log)
def test_significance_cli_verdicts_and_exit_codes(tmp_path, capsys, real_log):
    paths = list(map(str, write_logs(tmp_path, real_log)))
    assert significance.main(["--baseline", "1.92", "--logs", *paths]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "n: 3" in out and "df: 2" in out and "Student t-test" in out
    assert significance.main(["--baseline", "0.48", "--metric", "ngram", "--logs", *paths]) == 4  # a negative verdict
    assert "verdict: FAIL" in capsys.readouterr().out
    assert significance.main(["--baseline", "1.92", "--logs", *paths[:2]]) == 0
    assert "records need >= 3" in capsys.readouterr().err
    assert significance.main(["--baseline", "1.92", "--logs", paths[0]]) == 2
    hashed = tmp_path / "h.txt"
    hashed.write_text(seed_log(real_log, 1337, hashed=True))
    assert significance.main(["--baseline", "0.48", "--metric", "ngram", "--logs", paths[0], str(hashed)]) == 2
    assert "ngram_eval_exact" in capsys.readouterr().err


# ------------------------------------------------------------------ plot_logs

@pytest.mark.slow  # needs the real run (real_log)
def test_plot_writes_png_for_several_and_single_logs(tmp_path, real_log):
    paths = write_logs(tmp_path, real_log)
    trunc = tmp_path / "running.txt"
    trunc.write_text(seed_log(real_log, 42, truncate_at="step:12/"))
    for logs, name in ((paths + [trunc], "many.png"), (paths[:1], "one.png")):
        out = tmp_path / name
        assert plot_logs.main([*map(str, logs), "-o", str(out)]) == 0
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_spread_labels_keeps_order_gap_and_bounds():
    ys = plot_logs.spread_labels([1.0, 1.001, 0.999, 2.0], 0.1, 0.0, 2.05)
    order = sorted(range(4), key=lambda i: [1.0, 1.001, 0.999, 2.0][i])
    assert [round(ys[i], 6) for i in order] == sorted(round(y, 6) for y in ys)
    assert all(b - a >= 0.1 - 1e-12 for a, b in zip(sorted(ys), sorted(ys)[1:]))
    assert max(ys) <= 2.05 + 1e-12


def test_plot_rejects_foreign(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert plot_logs.main([str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert "notes.txt" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ make_record

@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_refuses_sha_mismatch_and_creates_nothing(tmp_path, capsys, real_log):
    script, _ = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42))
    logs.append(tmp_path / "other.txt")
    logs[-1].write_text(seed_log(real_log, 2024, sha="0" * 64))  # one seed ran other code
    assert make_record.main(record_args(tmp_path, script, logs)) == 2
    err = capsys.readouterr().err
    assert "other.txt" in err and "0" * 64 in err and "nothing was created" in err
    assert not (tmp_path / "records").exists()


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_refuses_logs_of_the_readable_script(tmp_path, capsys, real_log, tg):
    script, packed = real_script(tmp_path)
    source = script.read_bytes()
    readable_ident = (f"code_bytes:{len(source)} code_sha256:{hashlib.sha256(source).hexdigest()} code:readable "
                      f"source_sha256:{hashlib.sha256(source).hexdigest()} packed_bytes:{len(packed)}")
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42))
    logs[1].write_text(re.sub(r"^code_bytes:.*$", readable_ident, logs[1].read_text(), count=1, flags=re.M))
    assert make_record.main(record_args(tmp_path, script, logs)) == 2
    err = capsys.readouterr().err
    assert f"{logs[1]}: produced by the readable train_gpt.py" in err and "tools/pack.py pack" in err
    assert str(logs[0]) not in err.split("nothing was created")[0] and not (tmp_path / "records").exists()


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_takes_the_packed_file_as_it_is_and_names_a_repacked_one(tmp_path, capsys, real_log, tg):
    script, packed = real_script(tmp_path)
    ran = tmp_path / "ran" / "train_gpt.py"
    ran.parent.mkdir()
    ran.write_bytes(packed)
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42))
    assert make_record.main(record_args(tmp_path, ran, logs)) == 0, capsys.readouterr().err
    assert (tmp_path / "records" / "2026-03-30_ExactNgram" / "train_gpt.py").read_bytes() == packed
    other = tmp_path / "other" / "train_gpt.py"  # the same source, packed into other bytes (another bz2 build, say)
    other.parent.mkdir()
    other.write_bytes(packed.replace(b"; to read it,", b"; to read  it,", 1))
    assert make_record.main(record_args(tmp_path, other, logs, "--force")) == 2
    assert "packed file of this same source whose bytes differ" in capsys.readouterr().err


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_setup_for_a_gpu_run_pins_the_build_and_fetches_fa3_and_fineweb(tmp_path, real_log, tg):
    script, _ = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42), hparams={"data_path": tg.Hyperparameters.data_path})
    for log in logs:
        log.write_text(re.sub(r"^runtime device:cpu (.*) attention:sdpa (.*) torch:\S+$",
                              r"runtime device:cuda \1 attention:fa3 \2 torch:2.9.1+cu128", log.read_text(), flags=re.M))
    assert make_record.main(record_args(tmp_path, script, logs)) == 0
    folder = tmp_path / "records" / "2026-03-30_ExactNgram"
    reqs = (folder / "requirements.txt").read_text().splitlines()
    assert reqs[1:5] == ["--extra-index-url https://download.pytorch.org/whl/cu128",
                         "--find-links https://windreamer.github.io/flash-attention3-wheels/cu128_torch291",
                         "torch==2.9.1", "flash_attn_3"]
    readme = (folder / "README.md").read_text()
    assert "# torch 2.9.1+cu128, FlashAttention-3, the script's packages" in readme
    assert "\npython3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80   # FineWeb" in readme
    assert make_record.main(record_args(tmp_path, script, logs, "--force", "--data-command", "make data {x}")) == 0
    assert "\nmake data {x}\n" in (folder / "README.md").read_text()


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_builds_folder(tmp_path, capsys, real_log):
    script, packed = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log)
    run = logparse.parse_text(real_log)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0
    folder = tmp_path / "records" / "2026-03-30_ExactNgram"
    assert capsys.readouterr().out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                        "train_gpt.py", "train_seed1337.log", "train_seed2024.log",
                                                        "train_seed42.log"]
    assert (folder / "train_gpt.py").read_bytes() == packed  # the file that ran
    version, _, tag = run.runtime["torch"].partition("+")
    reqs = (folder / "requirements.txt").read_text().splitlines()
    assert f"torch=={version}" in reqs and ("zstandard" in reqs and "sentencepiece" in reqs and "numpy" in reqs)
    assert (f"--extra-index-url https://download.pytorch.org/whl/{tag}" in reqs) == bool(tag)
    assert "flash_attn_3" not in reqs and not any(r.startswith("--find-links") for r in reqs)  # the run used SDPA
    assert (folder / "train_seed42.log").read_text() == logs[1].read_text()
    sub = json.loads((folder / "submission.json").read_text())
    ng = [SEEDS[s]["ng_bpb"] for s in (1337, 42, 2024)]
    assert sub["val_bpb"] == pytest.approx(sum(ng) / 3, abs=1e-8)
    assert sub["val_loss"] == pytest.approx(sum(SEEDS[s]["ng_loss"] for s in SEEDS) / 3, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(logparse.mean_std(ng)[1], abs=1e-8)
    assert sub["bytes_total"] == run.total_bytes and sub["bytes_code"] == len(packed) and sub["seeds"] == [1337, 42, 2024]
    assert {k: sub[k] for k in ("author", "github_id", "name", "blurb", "date")} == {
        "author": "Ann", "github_id": "ann", "name": "ExactNgram", "blurb": "exact cache", "date": "2026-03-30"}
    readme = (folder / "README.md").read_text()
    assert "ITERATIONS=16 " in readme and " SEED=42 " in readme and " TTT_ENABLED=1 " in readme
    assert f"torchrun --standalone --nproc_per_node=1 {folder.as_posix()}/train_gpt.py" in readme
    assert "NGRAM_MODE=" not in readme
    assert f"python3 -m pip install -r {folder.as_posix()}/requirements.txt" in readme
    assert f"# DATA_PATH={run.hparams['data_path']} is not FineWeb sp1024" in readme  # the tiny corpus
    assert f"sha256 `{hashlib.sha256(packed).hexdigest()}`" in readme and f"`{run.source_sha256}`" in readme
    assert readme.count("- [x] PASS") == 5 and readme.count("- [ ] FAIL: scored on the whole validation split") == 1
    assert "sum_min:1.000000000" in readme and f"Total submission int6+zstd: {run.total_bytes} bytes" in readme
    assert f"seed 2024: `{run.step_lines[-1]['line']}`" in readme  # no stopping_early line: the last step line
    # an existing folder is kept unless --force
    assert make_record.main(record_args(tmp_path, script, logs)) == 2
    assert "already exists" in capsys.readouterr().err
    assert make_record.main(record_args(tmp_path, script, logs[:2], "--force")) == 0
    assert not (folder / "train_seed2024.log").exists()


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_roundtrip_score_without_ngram_and_unknown_defaults(tmp_path, real_log, tg):
    text = "print('no Hyperparameters here')\n"
    packed = tg.pack_source(text).encode()
    script = tmp_path / "train_gpt.py"
    script.write_text(text)
    logs = []
    for seed in (1337, 42):
        p = tmp_path / f"s{seed}.txt"
        log = seed_log(real_log, seed, sha=hashlib.sha256(packed).hexdigest())
        log = re.sub(r"^code_bytes:\d+ ", f"code_bytes:{len(packed)} ", log, flags=re.M)  # as if it had run
        kept = [ln for ln in log.splitlines() if "gram" not in ln.lower()]
        p.write_text("\n".join(kept + ["hparam ngram_enabled:0"]) + "\n")  # a run with the n-gram eval off
        logs.append(p)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0
    folder = tmp_path / "records" / "2026-03-30_ExactNgram"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx((SEEDS[1337]["rt_bpb"] + SEEDS[42]["rt_bpb"]) / 2, abs=1e-8)
    readme = (folder / "README.md").read_text()
    assert "every logged setting is listed" in readme and "ITERATIONS=16" in readme
    assert "normalization audit" not in readme


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_refuses_duplicate_seeds_mixed_settings_and_strict_failures(tmp_path, capsys, real_log):
    script, _ = real_script(tmp_path)
    a, b = write_logs(tmp_path, real_log, seeds=(1337, 42))
    dup = tmp_path / "dup.txt"
    dup.write_text(a.read_text())
    assert make_record.main(record_args(tmp_path, script, [a, dup])) == 2
    assert "one log per seed" in capsys.readouterr().err
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(seed_log(real_log, 2024, hparams={"ngram_max_order": "7"}))
    assert make_record.main(record_args(tmp_path, script, [a, mixed])) == 2
    assert "ngram_max_order: 9 vs 7" in capsys.readouterr().err
    slow = tmp_path / "slow.txt"
    slow.write_text(re.sub(r"^post_training_time:\S+$", "post_training_time:700000ms", seed_log(real_log, 2024),
                           flags=re.M))
    assert make_record.main(record_args(tmp_path, script, [a, slow], "--strict")) == 4  # a failed check
    assert "post-training time" in capsys.readouterr().err and not (tmp_path / "records").exists()
    assert make_record.main(record_args(tmp_path, script, [a, slow])) == 0
    assert "warning: compliance check failed" in capsys.readouterr().err
    assert "- [ ] FAIL: post-training time" in next((tmp_path / "records").iterdir()).joinpath("README.md").read_text()


@pytest.mark.slow  # needs the real run (real_log)
def test_real_script_hparam_lines_and_defaults(tmp_path, tg, capsys, real_log):
    """The real train_gpt.py: its hparam lines parse, and a default run's launch command only sets SEED."""
    h = tg.Hyperparameters(run_id="x")
    for line in h.log_lines():
        assert logparse.match_line(line)[0] == "hparam", line
    script, _ = real_script(tmp_path)
    logs = []
    for seed in (1337, 42, 2024):
        hp = {ln.split(" ", 1)[1].split(":", 1)[0]: ln.split(":", 1)[1] for ln in h.log_lines()}
        hp.update(seed=str(seed), run_id=f"run{seed}")
        p = tmp_path / f"s{seed}.txt"
        p.write_text(seed_log(real_log, seed, hparams=hp))
        logs.append(p)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0, capsys.readouterr().err
    readme = next((tmp_path / "records").iterdir()).joinpath("README.md").read_text()
    assert "\nSEED=2024 torchrun --standalone --nproc_per_node=1 " in readme and "/train_gpt.py\n" in readme
    assert "differ from the defaults" in readme


@pytest.mark.slow  # needs the real run (real_log)
def test_compliance_training_time_falls_back_to_last_step_line(real_log):
    last = re.findall(r"^step:16/16 val_loss:.*$", real_log, re.M)[-1]
    slow = re.sub(r"train_time:\d+ms", "train_time:600500ms", last)
    run = logparse.parse_text(real_log.replace(last, slow), "x.txt")
    item = make_record._check_train_time([run])
    assert item["ok"] is False and item["evidence"] == [f"seed 1337: `{slow}`"]


def test_make_record_checks_the_challenge_limits_at_their_boundaries():
    """The challenge's rules as they are written, not as make_record states them: code + model at most 16,000,000
    bytes, at most 600 s of training and 600 s after it, audited sums 1 (within 1e-6)."""
    def run(*lines):
        return logparse.parse_text("".join(line + "\n" for line in lines), "x.txt")
    for total, ok in ((16_000_000, True), (16_000_001, False)):
        assert make_record._check_size([run(f"Total submission int6+zstd: {total} bytes")])["ok"] is ok
    over = run("Total submission int6+zstd: 15000000 bytes", "artifact_over_limit total_bytes:15000000 limit:1")
    assert make_record._check_size([over])["ok"] is False  # the run's own verdict counts too
    for ms, ok in ((600_000, True), (600_001, False)):
        assert make_record._check_train_time([run(f"stopping_early: wallclock_cap train_time:{ms}ms step:9/20")])[
            "ok"] is ok
        assert make_record._check_post_time([run(f"post_training_time:{ms}ms")])["ok"] is ok
    for worst, ok in ((1.000001, True), (1.0000011, False), (0.9999989, False)):
        audit = f"ngram_audit positions:8 sum_min:{min(worst, 1.0):.9f} sum_median:1.000000000 sum_max:{max(worst, 1.0):.9f}"
        assert make_record._check_normalization([run(audit)])["ok"] is ok, audit
    assert make_record._check_normalization([run("post_training_time:1ms")])["ok"] is False  # no audit line


def test_peak_memory_is_the_largest_phase():
    run = logparse.parse_text("peak_memory allocated_mib:22669 reserved_mib:22812 phase:train\n"
                              "peak_memory allocated_mib:9120 reserved_mib:31000 phase:eval\n")  # reset in between
    assert run.peak_memory_mib == 22669 and [e["phase"] for e in run.events["peak_memory"]] == ["train", "eval"]
    assert logparse.parse_text("peak_memory rss_mib:900 phase:train\n").peak_memory_mib == 900
    assert logparse.parse_text("").peak_memory_mib is None


# ------------------------------------------------------------------ failed runs and bad input, every tool

def nan_log(real_log: str, seed: int, value: str = "nan") -> str:
    """A seed's log whose final scores are not finite (what a run with NaN weights printed), otherwise complete."""
    text = seed_log(real_log, seed)
    for event in ("final_int6_zstd_roundtrip", "final_int8_zlib_roundtrip", "ngram_eval"):
        text = re.sub(rf"^({event}(?:_exact)?) val_loss:\S+ val_bpb:\S+", rf"\1 val_loss:{value} val_bpb:{value}", text,
                      flags=re.M)
    return text


@pytest.mark.slow  # needs the real run (real_log)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_score_is_a_failed_run_for_every_tool(tmp_path, capsys, real_log, value):
    script, _ = real_script(tmp_path)
    good = write_logs(tmp_path, real_log, seeds=(1337, 42))
    bad = tmp_path / "logs" / "run2024.txt"
    bad.write_text(nan_log(real_log, 2024, value))
    assert "non-finite score" in logparse.incomplete_reason(logparse.parse_log(bad))
    # summarize: skipped with a warning, never averaged; alone it leaves nothing to summarize
    assert summarize_logs.main([*map(str, good), str(bad), "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert [r["seed"] for r in json.loads(captured.out)["rows"]] == [1337, 42] and "non-finite score" in captured.err
    assert summarize_logs.main([str(bad)]) == 2
    one_error_line(capsys.readouterr().err, warnings=True)
    # --allow-incomplete keeps it, with blank cells and strict JSON
    assert summarize_logs.main([str(good[0]), str(bad), "--allow-incomplete", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert data["rows"][1]["roundtrip_bpb"] is None and data["mean"]["roundtrip_bpb"] == SEEDS[1337]["rt_bpb"]
    # make_record: refused in one line, even with --allow-incomplete; nothing created
    for extra in ((), ("--allow-incomplete",)):
        assert make_record.main(record_args(tmp_path, script, [*good, bad], *extra)) == 2
        line = one_error_line(capsys.readouterr().err, warnings=True)
        assert str(bad) in line and "non-finite" in line and "nothing was created" in line
        assert not (tmp_path / "records").exists()
    # significance: refused in one line (it crashed on NaN)
    for metric in ("val_loss", "ngram_bpb"):
        assert significance.main(["--baseline", "1.92", "--metric", metric, "--logs", *map(str, good), str(bad)]) == 2
        assert str(bad) in one_error_line(capsys.readouterr().err, warnings=True)


@pytest.mark.slow  # needs the real run (real_log)
def test_make_record_allow_incomplete_refuses_a_log_without_a_score(tmp_path, capsys, real_log):
    script, _ = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log, seeds=(1337, 42))
    early = tmp_path / "logs" / "run2024.txt"
    early.write_text(seed_log(real_log, 2024, truncate_at="final_int6_zstd_roundtrip"))  # killed before its score
    assert make_record.main(record_args(tmp_path, script, [*logs, early], "--allow-incomplete")) == 2
    line = one_error_line(capsys.readouterr().err, warnings=True)
    assert str(early) in line and "no 'final_int6_zstd_roundtrip_exact' score" in line
    assert not (tmp_path / "records").exists()


@pytest.mark.slow  # needs the real run (real_log)
def test_significance_refuses_repeated_logs_seeds_and_scores(tmp_path, capsys, real_log):
    a, b = map(str, write_logs(tmp_path, real_log, seeds=(1337, 42)))
    copy = tmp_path / "copy.txt"
    copy.write_text(Path(a).read_text())
    same_scores = tmp_path / "same.txt"
    same_scores.write_text(seed_log(real_log, 1337).replace("hparam seed:1337\n", "hparam seed:7\n"))
    for logs, words in (([a, a], "same file"), ([a, b, str(copy)], "one log per seed"),
                        ([a, str(same_scores)], "no spread")):
        assert significance.main(["--baseline", "1.92", "--logs", *logs]) == 2, logs  # it said PASS p=0
        assert words in one_error_line(capsys.readouterr().err, warnings=True)


@pytest.mark.slow  # needs the real run (real_log)
def test_plot_to_a_missing_folder_is_one_line_and_writes_nothing(tmp_path, capsys, real_log):
    paths = write_logs(tmp_path, real_log, seeds=(1337,))
    out = tmp_path / "missing" / "curves.png"
    assert plot_logs.main([*map(str, paths), "-o", str(out)]) == 2
    assert f"-o {out}: cannot write" in one_error_line(capsys.readouterr().err, warnings=True)
    assert plot_logs.main([*map(str, paths), "-o", str(tmp_path / "curves.svg")]) == 0  # the format of the extension
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.svg", "logs"]  # no temporary file


@pytest.mark.slow  # needs the real run (real_log)
@pytest.mark.parametrize("force", [False, True])
def test_interrupted_make_record_leaves_no_temporary_folder_and_the_old_record(tmp_path, capsys, real_log,
                                                                              monkeypatch, force):
    script, _ = real_script(tmp_path)
    logs = write_logs(tmp_path, real_log)
    parent = tmp_path / "records"
    if force:
        assert make_record.main(record_args(tmp_path, script, logs[:2])) == 0
    before = {p.relative_to(parent): p.read_bytes() for p in parent.rglob("*") if p.is_file()} if force else None
    copies, copyfile = [], make_record.shutil.copyfile

    def copy_then_interrupt(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return copyfile(src, dst)

    monkeypatch.setattr(make_record.shutil, "copyfile", copy_then_interrupt)
    try:
        code = make_record.main(record_args(tmp_path, script, logs, *(("--force",) if force else ())))
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    assert code == 130
    assert one_error_line(capsys.readouterr().err, warnings=True) == "error: stopped by SIGINT"
    if force:
        assert {p.relative_to(parent): p.read_bytes() for p in parent.rglob("*") if p.is_file()} == before
        assert [p.name for p in parent.iterdir()] == ["2026-03-30_ExactNgram"]
    else:
        assert not parent.exists() or list(parent.iterdir()) == []
