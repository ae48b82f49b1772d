"""tools/preflight.py on CPU with tiny settings: every section and a verdict on 1 process (its main(argv), in this
process) and on 2 under gloo (torchrun, full tier);
failing checks (no data, an attention backend that cannot compile, a wrong manifest) give `fail` with their
reason; the watchdog turns a hang into a message naming NCCL settings. Run: python3 -m pytest tests/test_preflight.py
"""
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preflight
import train_gpt as tg
from conftest import ROOT, RT1, TINY_RUN, breaks_under_compile, main_in_process, one_error_line, tiny_env, tiny_hparams

TOOL = ROOT / "tools" / "preflight.py"
TINY_ARGS = ["--steps", "2", "--warmup", "1", "--eval-tokens", "1024", "--collective-iters", "2"]


@pytest.fixture(autouse=True)
def no_nvidia_smi(monkeypatch):
    """The environment section asks nvidia-smi for the driver version: a process, which in-process tests must not
    start (there is no GPU here anyway: the answer would be None)."""
    monkeypatch.setattr(preflight, "driver_version", lambda: None)


def tool_env(tiny_corpus, **extra_env):
    data_path, tok, vocab = tiny_corpus
    return tiny_env(VOCAB_SIZE=str(vocab), DATA_PATH=data_path, TOKENIZER_PATH=tok, **extra_env)


def run_in_process(tmp_path, tiny_corpus, monkeypatch, capsys, **extra_env):
    """main(argv) on one process, in this one, with the environment of a command line: (JSON on stdout, the table
    on stderr)."""
    argv = [*TINY_ARGS, "--json", "-"]
    assert main_in_process(tool_env(tiny_corpus, **extra_env), monkeypatch, tmp_path, preflight.main, argv) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def run_torchrun(tmp_path, tiny_corpus, nproc, **extra_env):
    """The command line under torchrun: (JSON from --json PATH, the table on stdout)."""
    out = tmp_path / "preflight.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(TOOL), *TINY_ARGS, "--json", str(out)], env=tool_env(tiny_corpus, **extra_env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def by_name(report):
    return {(c["section"], c["name"]): c for c in report["checks"]}


def check_every_section(report, text, world):
    checks = by_name(report)
    assert {c["section"] for c in report["checks"]} == set(preflight.SECTIONS)
    assert report["verdict"] == "ready" and report["world_size"] == world
    assert "| section | check | status | detail |" in text and "preflight verdict:ready" in text
    assert all(c["status"] in ("ok", "warn") for c in report["checks"])
    plain, qat = checks["training", "steps"]["figures"], checks["training", "steps_qat"]["figures"]
    assert plain["qat"] is False and qat["qat"] is True and plain["ms_per_step"] > 0 and qat["timed_steps"] == 2
    steps = checks["training", "projection"]["figures"]["projected_steps"]
    d = tg.Hyperparameters()  # the run's wall clock, QAT share and step cap: the defaults (tiny_env sets none)
    frac, budget_ms = (d.qat_time_frac if d.qat_enabled else 0.0), 1000 * d.max_wallclock_seconds
    assert steps == min(d.iterations, int((1 - frac) * budget_ms / plain["ms_per_step"]
                                          + frac * budget_ms / qat["ms_per_step"]))
    assert checks["data", "shards"]["figures"]["train_shards"] == 2
    assert checks["data", "manifest"]["status"] == "warn"  # the fixture writes none
    supply = checks["data", "supply"]["figures"]
    assert supply["tokens_needed"] == steps * (1024 // (world * 512)) * world * 513
    assert checks["evaluation", "throughput"]["figures"]["targets"] == 1024
    assert checks["evaluation", "throughput"]["figures"]["targets_small"] == 512  # two sizes: the n-gram growth
    projection = checks["evaluation", "projection"]
    assert projection["figures"]["projected_s"] >= projection["figures"]["projected_linear_s"] > 0
    assert "fitted a + b·ln(targets)" in projection["reason"]
    return checks


def test_one_process_every_section_with_ttt(tmp_path, tiny_corpus, monkeypatch, capsys, one_thread):
    report, text = run_in_process(tmp_path, tiny_corpus, monkeypatch, capsys, TTT_ENABLED="1", TTT_CHUNK_TOKENS="512")
    checks = check_every_section(report, text, 1)
    assert set(checks["evaluation", "throughput"]["figures"]["seconds"]) == {"one_pass", "ttt"}
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        assert checks["collectives", kind]["reason"] == "skipped (1 rank)"
    assert checks["attention", "backend"]["figures"]["backend"] == "sdpa"


@pytest.mark.slow
def test_two_ranks_gloo_every_section(tmp_path, tiny_corpus):
    report, text = run_torchrun(tmp_path, tiny_corpus, nproc=2)
    checks = check_every_section(report, text, 2)
    # padded Muon bank buffers of the tiny model (L=2, d=64, kv_dim=32, hidden=192), bf16
    bank_bytes = 2 * (4 * 64 * 64 + 4 * 32 * 64 + 2 * 192 * 64 + 2 * 64 * 192)
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        c = checks["collectives", kind]
        assert c["status"] == "ok" and c["figures"]["bytes"] == bank_bytes and c["figures"]["bus_bytes_per_s"] > 0
    assert set(checks["evaluation", "throughput"]["figures"]["seconds"]) == {"one_pass"}  # TTT off


def in_process(tiny_corpus, tmp_path, use_compile=False, **overrides):
    """A Preflight on one CPU process with the tiny test configuration."""
    data_path, tok, vocab = tiny_corpus
    fields = dict(TINY_RUN, vocab_size=vocab, data_path=data_path, tokenizer_path=tok)
    h = tiny_hparams(**{**fields, **overrides})
    rt = dataclasses.replace(RT1, use_compile=use_compile)
    return preflight.Preflight(preflight.parse_args(TINY_ARGS), h, rt)


def statuses(checks):
    return {(c.section, c.name): (c.status, c.reason) for c in checks}


def test_no_data_fails_with_reason(tmp_path, tiny_corpus, one_thread):
    pf = in_process(tiny_corpus, tmp_path, data_path=str(tmp_path / "missing"),
                    tokenizer_path=str(tmp_path / "missing.model"))
    checks = preflight.run_checks(pf)
    s = statuses(checks)
    assert s["data", "shards"][0] == "fail" and "no train shards match" in s["data", "shards"][1]
    assert s["data", "tokenizer"][0] == "fail" and "missing.model: cannot read" in s["data", "tokenizer"][1]
    assert s["training", "steps"][0] == "ok"  # timing still runs, on synthetic tokens
    assert "FineWeb" in s["evaluation", "projection"][1]
    assert preflight.verdict_line(checks).startswith("preflight verdict:not_ready")


def test_attention_backend_that_cannot_compile_fails(tmp_path, tiny_corpus, monkeypatch, one_thread):
    broken = tg.AttentionCandidate("broken", lambda: breaks_under_compile)
    monkeypatch.setattr(tg, "with_attention", functools.partial(tg.with_attention, candidates=(broken,)))
    pf = in_process(tiny_corpus, tmp_path, use_compile=True)
    checks = preflight.run_checks(pf)
    s = statuses(checks)
    assert s["attention", "backend"][0] == "fail" and "broken" in s["attention", "backend"][1]
    assert s["training", "steps"] == ("fail", "not run: the model could not be built (see attention)")
    assert s["evaluation", "throughput"][0] == "fail"
    assert "fail:" in preflight.verdict_line(checks) and "verdict:not_ready" in preflight.verdict_line(checks)


def test_manifest_match_and_mismatch(tmp_path, tiny_corpus):
    data = tmp_path / "data"
    shutil.copytree(tiny_corpus[0], data)
    pf = in_process(tiny_corpus, tmp_path, data_path=str(data))
    preflight.check_data(pf)
    assert statuses(pf.checks)["data", "manifest"][0] == "warn"  # none yet
    shards = {split: sorted(p.name for p in data.glob(f"*_{split}_*.bin")) for split in ("train", "val")}
    counts = {split: sum(len(tg.read_shard(data / n)) for n in names) for split, names in shards.items()}
    manifest = {"format": 1, "tokenizer_sha256": hashlib.sha256(Path(tiny_corpus[1]).read_bytes()).hexdigest(),
                "vocab_size": 320, "splits": {s: {"shards": shards[s], "tokens": counts[s]} for s in shards}}

    def manifest_check(m):
        (data / "manifest.json").write_text(json.dumps(m))
        pf.checks.clear()
        preflight.check_data(pf)
        return statuses(pf.checks)

    assert manifest_check(manifest)["data", "manifest"][0] == "ok"
    manifest["splits"]["val"]["tokens"] += 1
    status, reason = manifest_check(manifest)["data", "manifest"]
    assert status == "fail" and f"val.tokens: manifest {counts['val'] + 1} vs {counts['val']}" in reason
    s = manifest_check(dict(manifest, tokenizer_sha256="0" * 64))
    assert s["data", "tokenizer"][0] == "fail" and "is not the tokenizer the shards" in s["data", "tokenizer"][1]


def test_watchdog_turns_a_hang_into_nccl_advice():
    import time
    fired = []
    with preflight.watchdog(0.05, "test collective", on_timeout=fired.append):
        time.sleep(0.3)
    assert len(fired) == 1 and "test collective" in fired[0]
    for name in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG=INFO"):
        assert name in fired[0]
    with preflight.watchdog(5.0, "fast", on_timeout=fired.append):
        pass
    time.sleep(0.05)
    assert len(fired) == 1


def test_formulas():
    assert preflight.bus_bandwidth("all_reduce", 8e9, 1.0, 8) == pytest.approx(14e9)
    assert preflight.bus_bandwidth("all_gather", 8e9, 1.0, 8) == pytest.approx(7e9)
    h = tiny_hparams(max_wallclock_seconds=600.0, iterations=20000, qat_time_frac=0.15, qat_enabled=True)
    # the reference's 88.6 ms/step everywhere gives its 6,772 steps
    assert preflight.projected_steps(h, 88.6, 88.6) == 6772
    assert preflight.projected_steps(h, 100.0, 200.0) == int(0.85 * 6000 + 0.15 * 3000)
    assert preflight.projected_steps(dataclasses.replace(h, iterations=10), 1.0, 1.0) == 10
    assert preflight.projected_steps(dataclasses.replace(h, qat_enabled=False), 100.0, 1.0) == 6000


def test_user_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("NUM_HEADS", "5")
    monkeypatch.setenv("DEVICE", "cpu")
    with pytest.raises(SystemExit) as e:
        preflight.main(TINY_ARGS)
    assert e.value.code == 2
    one_error_line(capsys.readouterr().err, "NUM_HEADS=5")


def test_h100_left_on_sdpa_is_not_ready_unless_accepted(tmp_path, tiny_corpus, monkeypatch):
    """A fake sm_90 device where FlashAttention-3 did not load: the attention check fails (naming the cost and the
    fix) and the verdict is not_ready; ACCEPT_SDPA=1 turns it into a warning; another GPU only warns."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    skipped = (("fa3", "ModuleNotFoundError: No module named 'flash_attn_interface'"), ("fa4", "ModuleNotFoundError"))
    cpu = tg.with_attention(dataclasses.replace(RT1, use_compile=False), tiny_hparams()).attention  # SDPA, eager
    monkeypatch.setattr(tg, "with_attention", lambda rt, h, **kw: dataclasses.replace(
        rt, attention=cpu._replace(skipped=skipped)))

    def attention_check(**overrides):
        pf = in_process(tiny_corpus, tmp_path, use_compile=True, **overrides)
        pf.rt = dataclasses.replace(pf.rt, device=torch.device("cuda", 0))
        preflight.check_attention(pf)
        return pf.checks

    checks = attention_check()
    status, reason = statuses(checks)["attention", "backend"]
    assert status == "fail" and "+15-25 ms/step" in reason and "install_flash_attn.py" in reason
    assert "ACCEPT_SDPA=1" in reason and "fa3: ModuleNotFoundError" in reason
    assert preflight.verdict_line(checks).startswith("preflight verdict:not_ready")
    checks = attention_check(accept_sdpa=True)
    assert statuses(checks)["attention", "backend"][0] == "warn" and "accepted" in checks[0].reason
    assert preflight.verdict_line(checks).startswith("preflight verdict:ready")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert statuses(attention_check())["attention", "backend"][0] == "warn"


def test_eval_projection_fits_the_growing_ngram_cost():
    a, b = 2e-6, 3e-7  # seconds per target: a + b·ln(targets already in the tables)
    timed = lambda n: n * (a + b * (math.log(n) - 1))  # a pass over n targets (the integral of the per-target cost)
    small, large = (262_144, timed(262_144)), (524_288, timed(524_288))
    total = 62_021_632
    got = preflight.project_eval_seconds(small, large, total, grows=True)
    assert got == pytest.approx(timed(total), rel=1e-9)
    linear = preflight.project_eval_seconds(small, large, total, grows=False)
    assert linear == pytest.approx(total * large[1] / large[0]) and linear < got
    noisy = (262_144, 1.2 * timed(262_144))  # the small pass measured slower per target: no negative growth
    assert preflight.project_eval_seconds(noisy, large, total, grows=True) == pytest.approx(linear)


def test_not_ready_and_a_hang_exit_4(monkeypatch, capsys):
    """A negative verdict is exit 4 (a failed check), not 1 (a bug) or 2 (a user error)."""
    monkeypatch.setattr(preflight, "start", lambda args: None)
    monkeypatch.setattr(preflight, "run_checks", lambda pf: [])
    monkeypatch.setattr(preflight, "finish", lambda pf, checks: True)
    with pytest.raises(SystemExit) as e:
        preflight.main(TINY_ARGS)
    assert e.value.code == 4
    monkeypatch.setattr(preflight, "finish", lambda pf, checks: False)
    assert preflight.main(TINY_ARGS) == 0
    exits = []
    monkeypatch.setattr(preflight.os, "_exit", exits.append)
    preflight._exit_on_timeout("preflight: a collective did not finish")
    assert exits == [4] and "verdict:not_ready reason:timeout" in capsys.readouterr().out
