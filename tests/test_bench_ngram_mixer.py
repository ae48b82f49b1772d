"""tools/bench_ngram_mixer.py: model, seed rule and learned mixer from one pass on a tiny corpus, and its errors.
Run: python3 -m pytest tests/test_bench_ngram_mixer.py -q"""
import json
from pathlib import Path

import pytest

import bench_ngram_mixer as bench
import train_gpt as tg
from conftest import run_script, tiny_run_env


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A tiny model trained by the script itself on the tiny corpus (whose documents repeat phrases)."""
    tmp = tmp_path_factory.mktemp("mixer")
    env = tiny_run_env(tiny_corpus, tmp, ITERATIONS="20", VAL_LOSS_EVERY="0", NGRAM_ENABLED="0")
    assert run_script(env).returncode == 0
    return env["ARTIFACT_PATH"]


def test_table_of_one_pass_with_both_mixers(tiny_corpus, trained, tmp_path, monkeypatch, capsys):
    data, tok, _ = tiny_corpus
    monkeypatch.setenv("NGRAM_CHUNK_TOKENS", "256")
    monkeypatch.setenv("EVAL_SEQ_LEN", "64")
    monkeypatch.setenv("EVAL_STRIDE", "32")
    out = tmp_path / "m.json"
    code = bench.main(["--data", data, "--tokenizer", tok, "--artifact", trained, "--targets", "1024", "2048",
                       "--json", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert code in (0, 4), captured.err[-2000:]
    res = json.loads(out.read_text())
    assert [r["targets"] for r in res["rows"]] == [1024, 2048]
    for r in res["rows"]:
        assert r["seed_delta"] == pytest.approx(r["seed_bpb"] - r["model_bpb"], abs=1e-12)
        for kind in ("seed", "learned"):
            assert list(r[f"{kind}_used"]) == [f"o{n}" for n in range(2, 10)] and sum(r[f"{kind}_used"].values()) <= 1
        assert r["never_worse"] == (r["learned_bpb"] <= r["model_bpb"] + 0.0005)
        assert r["learned_fields"]["buckets_used"] > 0 and "w_o2" in r["learned_fields"]
    assert res["rows"][1]["never_worse"] and res["rows"][1]["learned_delta"] < 0  # the phrases repeat: it gains
    assert code == (0 if all(r["never_worse"] for r in res["rows"]) else 4)
    assert "| 2,048 | " in text and text.count("ngram_audit positions:") == 4  # both mixers audited, both sizes


def test_training_environment_is_the_cpu_demo_with_steps(tmp_path):
    env = bench.train_env(Path("d"), Path("t.model"), 400, tmp_path / "bench400.int6.ptz")
    h = tg.Hyperparameters.from_env(env)
    demo = tg.Hyperparameters.from_env(bench.CPU_DEMO_ENV)
    assert (h.iterations, h.ngram_enabled, h.val_loss_every) == (400, False, 0)
    for f in ("num_layers", "model_dim", "train_seq_len", "train_batch_tokens", "warmdown_iters", "ema_decay"):
        assert getattr(h, f) == getattr(demo, f), f
    assert env["ARTIFACT_PATH"] == str(tmp_path / "bench400.int6.ptz") and h.data_path == "d"
