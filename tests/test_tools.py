"""Tests of tools/ (log parser, summary, significance test, plots, record folder) on synthetic logs."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import logparse  # noqa: E402
import make_record  # noqa: E402
import plot_logs  # noqa: E402
import significance  # noqa: E402
import summarize_logs  # noqa: E402

# per-seed figures (SPEC 9.2-like): steps, step_avg, EMA bpb, round-trip loss/bpb, n-gram loss/bpb, total bytes
SEEDS = {
    1337: dict(steps=6774, avg=88.55, ema=1.1193, rt_loss=1.90443578, rt_bpb=1.12791767, ng_loss=0.47961142,
               ng_bpb=0.28405290, total=15854191),
    42: dict(steps=6772, avg=88.60, ema=1.1194, rt_loss=1.90393001, rt_bpb=1.12761002, ng_loss=0.47950011,
             ng_bpb=0.28399001, total=15924715),
    2024: dict(steps=6764, avg=88.70, ema=1.1191, rt_loss=1.90450123, rt_bpb=1.12795511, ng_loss=0.47955555,
               ng_bpb=0.28402222, total=15880000),
}
SOURCE_NOISE = [
    '"""Parameter Golf: 11-layer GQA transformer."""',
    "    log0(f\"step:{step}/{h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}\")",
    "    log0(f\"final_int6_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\")",
    "  final_int6_zstd_roundtrip_exact val_loss:… val_bpb:…   sliding-window score",
    "        return [f\"hparam {f.name}:{format_setting(getattr(self, f.name))}\"",
    "Total submission int6+zstd: {total} bytes",
    "=" * 100,
]
SHA_OF_SCRIPT = "ab" * 32


def log_text(seed, sha=SHA_OF_SCRIPT, code_bytes=93397, hashed=False, truncate_at=None, extra_hparams=None,
             hparams=None):
    """Realistic rank-0 log text of one seed, with source-code noise lines between header and training."""
    s = SEEDS[seed]
    hp = dict(hparams) if hparams is not None else {"iterations": "20000", "max_wallclock_seconds": "600.0", "ngram_mode": "hashed" if hashed else "exact",
          "run_id": f"run{seed}", "seed": str(seed), "train_batch_tokens": "786432", "val_max_tokens": "0",
          "ngram_max_order": "9", "diag_eval_candidates": "1"}
    hp.update(extra_hparams or {})
    lines = [f"logs/run{seed}.txt"] + [f"hparam {k}:{v}" for k, v in sorted(hp.items())]
    lines += [f"code_bytes:{code_bytes} code_sha256:{sha}",
              "runtime device:cuda world_size:8 grad_accum_steps:1 attention:fa3 compile:1 torch:2.9.1",
              "model_params:26744007",
              "val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/*_val_*.bin tokens:62021632 bytes:151080633"]
    lines += SOURCE_NOISE
    lines += [f"warmup_step:{i}/20" for i in range(1, 21)]
    lines.append(f"step:0/20000 val_loss:6.9300 val_bpb:4.1043 train_time:0ms step_avg:0.02ms")
    wiggle = (seed % 7) / 1000  # seeds differ a little
    train = [(1, 6.9312), (2, 8.6531)] + [(k, 7.5 - k * 0.4 + wiggle) for k in range(3, 11)]
    train += [(k, 2.3584 - (k / 6774) ** 0.5 * 0.3 + wiggle * (k % 1000 == 0)) for k in range(500, s["steps"], 500)]
    train += [(s["steps"], 2.0668 - wiggle)]
    for step, loss in train:
        t = step * s["avg"] if step > 10 else step * 88.84
        lines.append(f"step:{step}/20000 train_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{t / step:.2f}ms")
        if step == 4000:
            lines.append(f"step:4000/20000 val_loss:2.0118 val_bpb:1.1915 train_time:{t:.0f}ms step_avg:{s['avg']:.2f}ms")
        if step == 5500:
            lines.append("step:5757 QAT activated (time_frac=0.850, scale=0.2900)")
        if step == 6000:
            lines.append("swa:start step:6100")
    final_t = s["steps"] * s["avg"]
    lines += [f"step:{s['steps']}/20000 val_loss:1.8914 val_bpb:{1.1202 + wiggle:.4f} train_time:{final_t:.0f}ms step_avg:{s['avg']:.2f}ms",
              f"stopping_early: wallclock_cap train_time:{final_t:.0f}ms step:{s['steps']}/20000",
              "peak memory allocated: 22669 MiB reserved: 22812 MiB",
              f"diag_eval_ema val_loss:1.8900 val_bpb:{s['ema']:.4f} eval_time:70712ms",
              "diag_eval_swa val_loss:1.8940 val_bpb:1.1218 eval_time:70715ms",
              "export_weights:ema",
              f"Serialized model int6+zstd: {s['total'] - code_bytes} bytes (payload:27627290 raw_torch:27693135 payload_ratio:3.82x)",
              f"Total submission int6+zstd: {s['total']} bytes",
              f"artifact path:final_model.int6.ptz sha256:{'c' * 64} model_bytes:{s['total'] - code_bytes} "
              f"code_bytes:{code_bytes} total_bytes:{s['total']} limit:16000000",
              f"final_int6_zstd_roundtrip val_loss:{s['rt_loss']:.4f} val_bpb:{s['rt_bpb']:.4f} eval_time:86810ms",
              f"final_int6_zstd_roundtrip_exact val_loss:{s['rt_loss']:.8f} val_bpb:{s['rt_bpb']:.8f}",
              f"final_int8_zlib_roundtrip_exact val_loss:{s['rt_loss']:.8f} val_bpb:{s['rt_bpb']:.8f}",
              f"Starting N-gram eval: order 2-9 mode={'hashed' if hashed else 'exact'} chunk=65536"]
    lines += [f"ngram_chunk [{k}/947] running_bpb:{1.2 - k / 1000:.6f} elapsed:{k * 0.44:.1f}s" for k in range(0, 947, 20)]
    if hashed:
        lines += [f"ngram_hashed_unnormalized val_loss:{s['ng_loss']:.4f} val_bpb:{s['ng_bpb']:.4f} eval_time:416328ms",
                  f"ngram_hashed_unnormalized_exact val_loss:{s['ng_loss']:.8f} val_bpb:{s['ng_bpb']:.8f}"]
    else:
        lines += ["ngram_audit positions:256 sum_min:0.999999998 sum_median:1.000000000 sum_max:1.000000003",
                  f"ngram_eval val_loss:{s['ng_loss']:.4f} val_bpb:{s['ng_bpb']:.4f} eval_time:416328ms",
                  f"ngram_eval_exact val_loss:{s['ng_loss']:.8f} val_bpb:{s['ng_bpb']:.8f}"]
    lines.append("post_training_time:590123ms")
    if truncate_at is not None:
        lines = lines[:next(i for i, ln in enumerate(lines) if ln.startswith(truncate_at))]
    return "\n".join(lines) + "\n"


def write_logs(tmp_path, seeds=(1337, 42, 2024), **kw):
    """Write one log per seed into tmp_path/logs and return their paths."""
    d = tmp_path / "logs"
    d.mkdir(exist_ok=True)
    paths = []
    for seed in seeds:
        p = d / f"run{seed}.txt"
        p.write_text(log_text(seed, **kw))
        paths.append(p)
    return paths


def script_with_sha(tmp_path, text=None):
    """A small stand-in for train_gpt.py (a Hyperparameters dataclass with defaults); returns (path, sha, size)."""
    text = text or ("from __future__ import annotations\nimport dataclasses\n\n\n@dataclasses.dataclass(frozen=True)\nclass Hyperparameters:\n"
                    "    seed: int = 1337\n    iterations: int = 20000\n    max_wallclock_seconds: float = 600.0\n"
                    "    ngram_mode: str = 'exact'\n    ngram_max_order: int = 12\n    train_batch_tokens: int = 786432\n"
                    "    val_max_tokens: int = 0\n    diag_eval_candidates: bool = False\n    run_id: str = ''\n\n\n"
                    "def format_setting(v):\n    return str(int(v)) if isinstance(v, bool) else str(v)\n")
    path = tmp_path / "train_gpt.py"
    path.write_bytes(text.encode())
    return path, hashlib.sha256(text.encode()).hexdigest(), len(text.encode())


def record_args(tmp_path, script, logs, *extra):
    return ["--name", "ExactNgram", "--date", "2026-03-30", "--author", "Ann", "--github-id", "ann",
            "--blurb", "exact cache", "--script", str(script), "--out", str(tmp_path / "records"), *extra,
            *map(str, logs)]


# ------------------------------------------------------------------ parser

def test_parse_realistic_log_and_skip_source_noise(tmp_path):
    (path,) = write_logs(tmp_path, seeds=(1337,))
    run = logparse.require_complete(logparse.parse_log(path))
    assert run.seed == 1337 and run.run_id == "run1337" and run.world_size == 8
    assert run.hparams["ngram_mode"] == "exact" and len(run.hparams) == 9
    assert run.steps == 6774 and run.step_avg_ms == pytest.approx(88.55)
    assert run.train_time_ms == pytest.approx(round(6774 * 88.55))
    assert run.tokens_per_s == pytest.approx(786432 / 0.08855)
    assert run.tokens_per_s_per_device == pytest.approx(786432 / 0.08855 / 8)
    assert run.diag_bpb("ema") == 1.1193 and run.diag_bpb("swa") == 1.1218 and run.diag_bpb("raw") is None
    assert run.roundtrip_exact == {"val_loss": 1.90443578, "val_bpb": 1.12791767}
    assert run.ngram_exact["val_bpb"] == 0.2840529
    assert run.total_bytes == 15854191 and run.code_bytes == 93397 and run.code_sha256 == SHA_OF_SCRIPT
    assert run.post_training_ms == 590123
    assert run.event("ngram_audit")["sum_max"] == pytest.approx(1.000000003)
    assert len(run.events["ngram_chunk"]) == 48 and run.event("qat")["step"] == 5757


def test_source_code_lines_are_not_events():
    for line in SOURCE_NOISE:
        assert logparse.match_line(line) is None, line
    assert logparse.match_line("step:7/20000 train_loss:3.1000 train_time:622ms step_avg:88.84ms")[0] == "train_step"
    assert logparse.match_line("hparam ngram_mode:exact") == ("hparam", {"key": "ngram_mode", "value": "exact"})


# ------------------------------------------------------------------ summarize_logs

def test_summarize_numbers_mean_std_and_json(tmp_path, capsys):
    paths = write_logs(tmp_path)
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
    assert data["mean"]["steps"] == pytest.approx((6774 + 6772 + 6764) / 3)
    assert data["rows"][1]["tokens_per_s"] == pytest.approx(786432 / 0.0886)
    assert data["rows"][0]["ngram_bpb"] == SEEDS[1337]["ng_bpb"] and data["rows"][0]["total_bytes"] == 15854191
    assert data["rows"][0]["post_training_s"] == pytest.approx(590.123)


def test_summarize_text_table_single_log(tmp_path, capsys):
    (path,) = write_logs(tmp_path, seeds=(42,))
    assert summarize_logs.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "run42" in out and "1.127610" in out and "mean" not in out


@pytest.mark.parametrize("kind", ["truncated", "killed_in_ngram", "failed", "foreign"])
def test_summarize_skips_unusable_logs_with_a_warning(tmp_path, capsys, kind):
    good = write_logs(tmp_path, seeds=(1337, 2024))
    bad = tmp_path / f"{kind}.txt"
    bad.write_text({"truncated": log_text(42, truncate_at="final_int6_zstd_roundtrip"),
                    "killed_in_ngram": log_text(42, truncate_at="ngram_audit"),
                    "failed": log_text(42) + "run_failed reason:artifact_over_limit limit:16000000\n",
                    "foreign": "import torch\nprint('hello')\nstep:1/10 train_loss:1.0 train_time:1ms step_avg:1.00ms\n"}[kind])
    assert summarize_logs.main([str(good[0]), str(bad), str(good[1]), "--json", "-"]) == 0  # not stopped by it
    captured = capsys.readouterr()
    assert [row["seed"] for row in json.loads(captured.out)["rows"]] == [1337, 2024]
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and str(bad) in warning[0]
    assert {"truncated": "truncated", "killed_in_ngram": "n-gram", "failed": "run failed",
            "foreign": "no 'hparam"}[kind] in warning[0]
    assert summarize_logs.main([str(bad)]) == 1 and "error: none of the 1 log(s)" in capsys.readouterr().err


def test_json_option_means_the_same_in_every_tool(tmp_path, capsys):
    paths = list(map(str, write_logs(tmp_path)))
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
        assert main([*args, "--json", str(tmp_path / "missing" / "x.json")]) == 1  # user error: exit 1, one line
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --json") and not list((tmp_path / "missing").glob("*")) if (
            tmp_path / "missing").exists() else err[-1].startswith("error: --json")
    bench = subprocess.run([sys.executable, str(TOOLS / "bench_ngram_cache.py"), "--tokens", "3000", "--chunk", "1000",
                            "--device", "cpu", "--json", "-"], capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["tokens"] == 3000 and "tokens_per_s:" in bench.stderr


def test_bench_train_user_error_exits_1_in_one_line():
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("NUM_", "MODEL_"))}
    out = subprocess.run([sys.executable, str(TOOLS / "bench_train.py"), "--synthetic"], capture_output=True,
                         text=True, timeout=120, env=dict(env, NUM_HEADS="0", DEVICE="cpu"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "error: invalid settings: NUM_HEADS=0" in out.stderr


def test_make_record_refuses_incomplete_logs_unless_allowed(tmp_path, capsys):
    script, sha, size = script_with_sha(tmp_path)
    logs = write_logs(tmp_path, sha=sha, code_bytes=size, seeds=(1337, 42))
    killed = tmp_path / "logs" / "run2024.txt"
    killed.write_text(log_text(2024, sha=sha, code_bytes=size, truncate_at="ngram_audit"))  # killed during the n-gram eval
    assert make_record.main(record_args(tmp_path, script, [*logs, killed])) == 1
    err = capsys.readouterr().err
    assert str(killed) in err and "n-gram" in err and not (tmp_path / "records").exists()
    assert make_record.main(record_args(tmp_path, script, [*logs, killed], "--allow-incomplete")) == 0


def test_summarize_allow_incomplete_and_hashed(tmp_path, capsys):
    trunc = tmp_path / "t.txt"
    trunc.write_text(log_text(42, truncate_at="step:5000"))
    hashed = tmp_path / "h.txt"
    hashed.write_text(log_text(1337, hashed=True))
    assert summarize_logs.main([str(trunc), str(hashed), "--allow-incomplete", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["roundtrip_bpb"] is None and data["rows"][0]["steps"] == 4500
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


def test_significance_cli_verdicts_and_exit_codes(tmp_path, capsys):
    paths = list(map(str, write_logs(tmp_path)))
    assert significance.main(["--baseline", "1.92", "--logs", *paths]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "n: 3" in out and "df: 2" in out and "Student t-test" in out
    assert significance.main(["--baseline", "0.48", "--metric", "ngram", "--logs", *paths]) == 0
    assert "verdict: FAIL" in capsys.readouterr().out
    assert significance.main(["--baseline", "0.48", "--metric", "ngram", "--strict", "--logs", *paths]) == 1
    capsys.readouterr()
    assert significance.main(["--baseline", "1.92", "--logs", *paths[:2]]) == 0
    assert "records need >= 3" in capsys.readouterr().err
    assert significance.main(["--baseline", "1.92", "--logs", paths[0]]) == 1
    hashed = tmp_path / "h.txt"
    hashed.write_text(log_text(1337, hashed=True))
    assert significance.main(["--baseline", "0.48", "--metric", "ngram", "--logs", paths[0], str(hashed)]) == 1
    assert "ngram_eval_exact" in capsys.readouterr().err


# ------------------------------------------------------------------ plot_logs

def test_plot_writes_png_for_several_and_single_logs(tmp_path):
    paths = write_logs(tmp_path)
    trunc = tmp_path / "running.txt"
    trunc.write_text(log_text(42, truncate_at="step:3000"))
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
    assert plot_logs.main([str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "notes.txt" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ make_record

def test_make_record_refuses_sha_mismatch_and_creates_nothing(tmp_path, capsys):
    script, sha, size = script_with_sha(tmp_path)
    logs = write_logs(tmp_path, seeds=(1337, 42), sha=sha, code_bytes=size)
    logs.append(tmp_path / "other.txt")
    logs[-1].write_text(log_text(2024, sha="0" * 64, code_bytes=size))  # one seed ran other code
    assert make_record.main(record_args(tmp_path, script, logs)) == 1
    err = capsys.readouterr().err
    assert "other.txt" in err and "0" * 64 in err and "nothing was created" in err
    assert not (tmp_path / "records").exists()


def test_make_record_builds_folder(tmp_path, capsys):
    script, sha, size = script_with_sha(tmp_path)
    logs = write_logs(tmp_path, sha=sha, code_bytes=size)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0
    folder = tmp_path / "records" / "2026-03-30_ExactNgram"
    assert capsys.readouterr().out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "submission.json", "train_gpt.py",
                                                        "train_seed1337.log", "train_seed2024.log", "train_seed42.log"]
    assert (folder / "train_gpt.py").read_bytes() == script.read_bytes()
    assert (folder / "train_seed42.log").read_text() == logs[1].read_text()
    sub = json.loads((folder / "submission.json").read_text())
    ng = [SEEDS[s]["ng_bpb"] for s in (1337, 42, 2024)]
    assert sub["val_bpb"] == pytest.approx(sum(ng) / 3, abs=1e-8)
    assert sub["val_loss"] == pytest.approx(sum(SEEDS[s]["ng_loss"] for s in SEEDS) / 3, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(logparse.mean_std(ng)[1], abs=1e-8)
    assert sub["bytes_total"] == 15924715 and sub["bytes_code"] == size and sub["seeds"] == [1337, 42, 2024]
    assert {k: sub[k] for k in ("author", "github_id", "name", "blurb", "date")} == {
        "author": "Ann", "github_id": "ann", "name": "ExactNgram", "blurb": "exact cache", "date": "2026-03-30"}
    readme = (folder / "README.md").read_text()
    assert "DIAG_EVAL_CANDIDATES=1 NGRAM_MAX_ORDER=9 SEED=42 torchrun --standalone --nproc_per_node=8" in readme
    assert "ITERATIONS=" not in readme and readme.count("- [x] PASS") == 6 and "FAIL" not in readme
    assert "sum_min:0.999999998" in readme and "Total submission int6+zstd: 15924715 bytes" in readme
    assert "seed 2024: `stopping_early: wallclock_cap train_time:599967ms step:6764/20000`" in readme
    # an existing folder is kept unless --force
    assert make_record.main(record_args(tmp_path, script, logs)) == 1
    assert "already exists" in capsys.readouterr().err
    assert make_record.main(record_args(tmp_path, script, logs[:2], "--force")) == 0
    assert not (folder / "train_seed2024.log").exists()


def test_make_record_roundtrip_score_without_ngram_and_unknown_defaults(tmp_path):
    script, sha, size = script_with_sha(tmp_path, text="print('no Hyperparameters here')\n")
    logs = []
    for seed in (1337, 42):
        p = tmp_path / f"s{seed}.txt"
        text = log_text(seed, sha=sha, code_bytes=size)
        kept = [ln for ln in text.splitlines() if "gram" not in ln.lower()]
        p.write_text("\n".join(kept + ["hparam ngram_enabled:0"]) + "\n")  # a run with the n-gram eval off
        logs.append(p)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0
    folder = tmp_path / "records" / "2026-03-30_ExactNgram"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx((SEEDS[1337]["rt_bpb"] + SEEDS[42]["rt_bpb"]) / 2, abs=1e-8)
    readme = (folder / "README.md").read_text()
    assert "every logged setting is listed" in readme and "ITERATIONS=20000" in readme
    assert "normalization audit" not in readme


def test_make_record_refuses_duplicate_seeds_mixed_settings_and_strict_failures(tmp_path, capsys):
    script, sha, size = script_with_sha(tmp_path)
    a, b = write_logs(tmp_path, seeds=(1337, 42), sha=sha, code_bytes=size)
    dup = tmp_path / "dup.txt"
    dup.write_text(a.read_text())
    assert make_record.main(record_args(tmp_path, script, [a, dup])) == 1
    assert "one log per seed" in capsys.readouterr().err
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(log_text(2024, sha=sha, code_bytes=size, extra_hparams={"ngram_max_order": "7"}))
    assert make_record.main(record_args(tmp_path, script, [a, mixed])) == 1
    assert "ngram_max_order: 9 vs 7" in capsys.readouterr().err
    slow = tmp_path / "slow.txt"
    slow.write_text(log_text(2024, sha=sha, code_bytes=size).replace("post_training_time:590123ms",
                                                                      "post_training_time:700000ms"))
    assert make_record.main(record_args(tmp_path, script, [a, slow], "--strict")) == 1
    assert "post-training time" in capsys.readouterr().err and not (tmp_path / "records").exists()
    assert make_record.main(record_args(tmp_path, script, [a, slow])) == 0
    assert "warning: compliance check failed" in capsys.readouterr().err
    assert "- [ ] FAIL: post-training time" in next((tmp_path / "records").iterdir()).joinpath("README.md").read_text()


def test_clis_have_help():
    for tool in ("summarize_logs", "significance", "plot_logs", "make_record"):
        out = subprocess.run([sys.executable, str(TOOLS / f"{tool}.py"), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, tool


def test_real_script_hparam_lines_and_defaults(tmp_path, tg, capsys):
    """The real train_gpt.py: its hparam lines parse, and a default run's launch command only sets SEED."""
    h = tg.Hyperparameters(run_id="x")
    for line in h.log_lines():
        assert logparse.match_line(line)[0] == "hparam", line
    script = Path(tg.__file__)
    sha, size = hashlib.sha256(script.read_bytes()).hexdigest(), script.stat().st_size
    logs = []
    for seed in (1337, 42, 2024):
        hp = {ln.split(" ", 1)[1].split(":", 1)[0]: ln.split(":", 1)[1] for ln in h.log_lines()}
        hp.update(seed=str(seed), run_id=f"run{seed}")
        p = tmp_path / f"s{seed}.txt"
        p.write_text(log_text(seed, sha=sha, code_bytes=size, hparams=hp))
        logs.append(p)
    assert make_record.main(record_args(tmp_path, script, logs)) == 0, capsys.readouterr().err
    readme = next((tmp_path / "records").iterdir()).joinpath("README.md").read_text()
    assert "\nSEED=2024 torchrun --standalone --nproc_per_node=8 train_gpt.py\n" in readme
    assert "differ from the defaults" in readme


def test_compliance_training_time_falls_back_to_last_step_line(tmp_path):
    text = "\n".join(ln for ln in log_text(42).splitlines() if not ln.startswith("stopping_early"))
    run = logparse.parse_text(text.replace("train_time:599999ms", "train_time:600500ms"), "x.txt")
    item = make_record._check_train_time([run])
    assert item["ok"] is False and item["evidence"] == [
        "seed 42: `step:6772/20000 val_loss:1.8914 val_bpb:1.1202 train_time:600500ms step_avg:88.60ms`"]
