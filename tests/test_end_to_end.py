"""Whole runs of train_gpt.py on a tiny synthetic corpus, single process and torchrun x2 (gloo).
Run: python3 -m pytest tests/test_end_to_end.py"""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, one_error_line, run_script, tiny_run_env

CODE_LINE = r"^code_bytes:(\d+) code_sha256:([0-9a-f]{64}) code:(readable|packed) source_sha256:([0-9a-f]{64}) packed_bytes:(\d+)$"


def check_log(log: str, env) -> dict:
    floats = lambda pat: [float(x) for x in re.findall(pat, log)]
    train_losses = floats(r"step:\d+/\d+ train_loss:([\d.]+)")
    assert len(train_losses) >= 5 and train_losses[-1] < train_losses[0] - 0.5, train_losses
    assert re.search(r"^step:30/30 val_loss:[\d.]+ val_bpb:[\d.]+", log, re.M)
    assert re.search(CODE_LINE, log, re.M)
    assert re.search(r"^hparam seed:1337$", log, re.M) and "peak_memory rss_mib:" in log
    model_bytes = int(re.search(r"^serialized model_bytes:(\d+) ", log, re.M).group(1))
    code_bytes = int(re.search(r"^code_bytes:(\d+)", log, re.M).group(1))
    total = int(re.search(r"^Total submission int6\+zstd: (\d+) bytes", log, re.M).group(1))
    assert total == model_bytes + code_bytes
    assert model_bytes == os.path.getsize(env["ARTIFACT_PATH"])
    rt = re.search(r"^final_int6_zstd_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
    alias = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
    assert rt and alias and rt.groups() == alias.groups()
    audit = re.search(r"^ngram_audit positions:(\d+) sum_min:([\d.]+) sum_median:([\d.]+) sum_max:([\d.]+)", log, re.M)
    assert audit and int(audit.group(1)) > 0
    assert all(abs(float(audit.group(i)) - 1.0) < 1e-6 for i in (2, 3, 4))
    ng = re.search(r"^ngram_eval_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
    assert ng and re.search(r"^post_training_time:\d+ms$", log, re.M)
    phases = re.findall(r"^peak_memory rss_mib:\d+ phase:(\w+)$", log, re.M)
    assert phases == ["train", "eval"] and log.index("phase:eval") > log.index("ngram_eval_exact")  # after the evals
    assert re.search(r"^ngram_start .* mixer:learned$", log, re.M)
    assert re.search(r"^ngram_mixer mixer:learned score:ngram_eval targets:\d+ used_o2:", log, re.M)
    assert float(ng.group(2)) <= float(rt.group(2)) + 0.0005  # the learned mixture never loses to the model
    return {"roundtrip_bpb": float(rt.group(2)), "ngram_bpb": float(ng.group(2))}


@pytest.mark.slow
def test_single_process_run(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, EXPORT_WEIGHTS="raw", DIAG_EVAL_CANDIDATES="1", VAL_LAST_STEP="1")
    out = run_script(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    scores = check_log(log, env)
    # the round trip scores the exported (raw) weights after int6+zstd: close to their fp score, not equal
    fp_bpb = float(re.search(r"^diag_eval_raw val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M).group(1))
    assert abs(scores["roundtrip_bpb"] - fp_bpb) < 0.05 * fp_bpb, (scores, fp_bpb)
    assert re.search(r"^diag_eval_ema val_loss:", log, re.M) and "export_weights:raw" in log
    assert "def main()" in log  # the log file holds the source text; the console does not
    assert "def main()" not in out.stdout


@pytest.mark.slow
def test_torchrun_two_processes(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, USE_EXPERIMENTAL_CUDNN_V8_API="1", TRAIN_DIR="/tmp", EVAL_MODE="x",
                       VAL_LAST_STEP="1")
    del env["TRAIN_MICRO_BATCH_TOKENS"]  # TRAIN_BATCH_TOKENS alone: 8 micro-steps over the world, as upstream
    out = run_script(env, nproc=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    check_log(log, env)
    assert "world_size:2 grad_accum_steps:4" in log and "hparam train_micro_batch_tokens:0" in log
    for name in ("EVAL_MODE", "TRAIN_DIR", "USE_EXPERIMENTAL_CUDNN_V8_API"):  # reported, never fatal
        assert re.search(rf"^env_ignored name:{name}$", log, re.M)


@pytest.mark.slow
def test_over_limit_artifact_fails_after_evals(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, ARTIFACT_LIMIT_BYTES="1000", ITERATIONS="3", VAL_LOSS_EVERY="0",
                       NGRAM_ENABLED="0")
    out = run_script(env)
    assert out.returncode == 3, out.stderr[-2000:]  # the exit code of an artifact over the size limit
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    assert "artifact_over_limit" in log and "final_int6_zstd_roundtrip_exact" in log
    assert log.splitlines()[-1] == "run_failed reason:artifact_over_limit limit:1000"


@pytest.mark.slow
def test_eval_only_rescores_an_existing_artifact(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="4", VAL_LOSS_EVERY="0")
    assert run_script(env).returncode == 0
    first = (tmp_path / "logs" / "e2e.txt").read_text()
    shape = ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "ROPE_DIMS", "XSA_LAST_N", "BIGRAM_VOCAB_SIZE",
             "BIGRAM_DIM", "VOCAB_SIZE")
    env2 = {k: v for k, v in env.items() if k not in shape}  # the model is rebuilt from the artifact's record
    env2.update(EVAL_ONLY="1", RUN_ID="again", TTT_ENABLED="1", TTT_CHUNK_TOKENS="512",
                TTT_LR="0.01")
    out = run_script(env2)
    assert out.returncode == 0, out.stderr[-3000:]
    again = (tmp_path / "logs" / "again.txt").read_text()
    sha = hashlib.sha256(Path(env["ARTIFACT_PATH"]).read_bytes()).hexdigest()
    size = os.path.getsize(env["ARTIFACT_PATH"])
    assert re.search(rf"^artifact path:\S+ sha256:{sha} model_bytes:{size} code_bytes:\d+ code:readable total_bytes:\d+ "
                     r"limit:16000000 packed_total_bytes:\d+$", again, re.M)
    assert re.search(r"^Total submission int6\+zstd: \d+ bytes$", again, re.M) and "hparam num_layers:2" in again
    pick = lambda log, key: re.search(rf"^{key} val_loss:\S+ val_bpb:\S+$", log, re.M).group(0)
    for key in ("final_int6_zstd_roundtrip_exact", "ngram_eval_exact"):
        assert pick(first, key) == pick(again, key)  # the TTT pass (TTT_ENABLED=1) leaves the plain scores alone
    for key in ("legal_ttt_exact", "ttt_ngram_eval_exact"):
        assert pick(again, key) and not re.search(rf"^{key} ", first, re.M)
    assert re.search(r"^ngram_mixer mixer:learned score:ttt_ngram_eval targets:2048 ", again, re.M)  # the same mixer
    assert re.search(r"^ttt_start chunks:4 chunk_tokens:512 ", again, re.M)
    assert not re.search(r"^step:\d+/\d+ train_loss:", again, re.M)
    assert not re.search(r"^serialized ", again, re.M)
    # (settings that conflict with the artifact: tests/test_user_errors.py, in-process)


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run(tiny_corpus, tmp_path):
    env = tiny_run_env(tiny_corpus, tmp_path, TIED_EMBED_LR="1e20", SCALAR_LR="1e20", MATRIX_LR="1e20",
                       GRAD_CLIP_NORM="0", ITERATIONS="10", VAL_LOSS_EVERY="0")
    out = run_script(env)
    assert out.returncode == 4, out.stderr[-2000:]  # a failed run, not a bug: one line, no traceback
    assert one_error_line(out.stderr, alone=False).startswith("error: training diverged")
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    assert re.search(r"^nonfinite_loss step:\d+", log, re.M)
    assert log.splitlines()[-1].startswith("run_failed reason:diverged detail:training diverged: non-finite loss")
    assert not re.search(r"^serialized ", log, re.M)


NODE_WRAPPER = """import hashlib, json, sys
sys.path.insert(0, {root!r})
import train_gpt as tg
real_evaluate, real_roundtrip, seen = tg.evaluate_artifact, tg.roundtrip_eval, {{}}
def evaluate_artifact(art, h, rt, val):
    seen.update(rank=rt.rank, artifact_sha256=hashlib.sha256(art.blob).hexdigest())
    return real_evaluate(art, h, rt, val)
def roundtrip_eval(model, val, h, rt):
    results = real_roundtrip(model, val, h, rt)
    seen.update({{name: [r.loss, r.bpb] for name, r in results.items()}})
    open(f"scores.rank{{rt.rank}}.json", "w").write(json.dumps(seen))  # in this node's working directory
    return results
tg.evaluate_artifact, tg.roundtrip_eval = evaluate_artifact, roundtrip_eval
tg.main()
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_without_shared_storage_score_the_same(tiny_corpus, tmp_path):
    """Two torchrun "nodes" (c10d rendezvous on localhost, one process each), each in its own working directory
    with relative LOG_DIR and ARTIFACT_PATH: rank 0 writes the artifact in its folder only and broadcasts its bytes,
    so both ranks evaluate the same artifact and finish with the same scores."""
    import json
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="6", VAL_LOSS_EVERY="0", LOG_DIR="logs",
                       ARTIFACT_PATH="final_model.int6.ptz", RUN_ID="nodes")
    port, procs, nodes = free_port(), [], [tmp_path / "node0", tmp_path / "node1"]
    for node_rank, cwd in enumerate(nodes):
        cwd.mkdir()
        (cwd / "wrapper.py").write_text(NODE_WRAPPER.format(root=str(ROOT)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=two_nodes", "wrapper.py"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    scores = [json.loads(next(cwd.glob("scores.rank*.json")).read_text()) for cwd in nodes]
    assert sorted(s["rank"] for s in scores) == [0, 1]  # c10d, not --node_rank, decides which node is rank 0
    main = next(cwd for cwd, s in zip(nodes, scores) if s["rank"] == 0)
    other = next(cwd for cwd in nodes if cwd != main)
    assert (main / "final_model.int6.ptz").is_file() and not (other / "final_model.int6.ptz").exists()
    assert not (other / "logs").exists()
    blob = (main / "final_model.int6.ptz").read_bytes()
    assert scores[0] == {**scores[1], "rank": scores[0]["rank"]}  # same artifact bytes, same scores on both ranks
    assert scores[0]["artifact_sha256"] == hashlib.sha256(blob).hexdigest()
    log = (main / "logs" / "nodes.txt").read_text()
    assert "world_size:2 " in log
    rt_line = re.search(r"^final_int6_zstd_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
    assert rt_line and float(rt_line.group(2)) == pytest.approx(scores[0]["model"][1], abs=1e-8)


# fields that hold wall-clock times or memory: the only differences allowed between two runs of the same settings
CLOCK_FIELD = re.compile(r"\b(train_time|step_avg|eval_time|elapsed|rss_mib|post_training_time):[\d.]+(ms|s)?")


def run_in(folder: Path, script: Path, env: dict) -> str:
    """Run `script` with cwd = folder and relative log/artifact paths (so the settings of two runs are equal)."""
    folder.mkdir()
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=folder, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return (folder / "logs" / "e2e.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_packed_script_runs_exactly_as_the_readable_one(tiny_corpus, tmp_path):
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    packed = tmp_path / "packed_train_gpt.py"
    packed.write_text(tg.pack_source(source), encoding="utf-8")
    env = tiny_run_env(tiny_corpus, tmp_path, ITERATIONS="12", WARMDOWN_ITERS="4", VAL_LOSS_EVERY="6",
                       TRAIN_LOG_EVERY="3", LOG_DIR="logs", ARTIFACT_PATH="model.int6.ptz")
    logs = {form: run_in(tmp_path / form, script, env)
            for form, script in (("readable", ROOT / "train_gpt.py"), ("packed", packed))}
    ident = {form: re.search(CODE_LINE, log, re.M).groups() for form, log in logs.items()}
    source_sha = hashlib.sha256(source.encode()).hexdigest()
    packed_sha = hashlib.sha256(packed.read_bytes()).hexdigest()
    assert ident["readable"] == (str(len(source.encode())), source_sha, "readable", source_sha,
                                 str(packed.stat().st_size))
    assert ident["packed"] == (str(packed.stat().st_size), packed_sha, "packed", source_sha, str(packed.stat().st_size))
    art = {form: re.search(r"^artifact path:model.int6.ptz sha256:(\w+) model_bytes:(\d+) code_bytes:(\d+) "
                           r"code:(\w+) total_bytes:(\d+) limit:\d+ packed_total_bytes:(\d+)$", log, re.M).groups()
           for form, log in logs.items()}
    assert art["readable"][:2] == art["packed"][:2]  # same artifact bytes
    assert art["readable"][5] == art["packed"][4] == art["packed"][5]  # the headroom the readable run announced
    for form in logs:
        assert (tmp_path / form / "model.int6.ptz").read_bytes() == (tmp_path / "readable" / "model.int6.ptz").read_bytes()
    # every other line is the same: settings, losses, scores, audit, the source text; only clocks differ
    identity = ("code_bytes:", "Total submission", "artifact path:")
    same = {form: [CLOCK_FIELD.sub(r"\1:*", ln) for ln in log.splitlines() if not ln.startswith(identity)]
            for form, log in logs.items()}
    assert same["readable"] == same["packed"]
    for key in (r"step:\d+/12 train_loss:", "final_int6_zstd_roundtrip_exact ", "ngram_eval_exact ", "ngram_audit "):
        assert re.search(rf"^{key}", logs["packed"], re.M), key
