"""Hyperparameters: env parsing, unknown settings, validation messages, logging. Run: python3 -m pytest tests/test_config.py"""
import dataclasses
import re

import pytest

import train_gpt as tg
from conftest import CPU_DEMO_ENV, ROOT


def test_defaults_are_the_record_configuration():
    h = tg.Hyperparameters.from_env({"RUN_ID": "x"})
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_hidden) == (11, 512, 8, 4, 1536)
    assert (h.train_batch_tokens, h.train_seq_len, h.iterations, h.warmdown_iters) == (786432, 2048, 20000, 3500)
    assert (h.matrix_lr, h.scalar_lr, h.tied_embed_lr, h.muon_wd, h.adam_wd, h.grad_clip_norm) == (
        0.025, 0.025, 0.035, 0.04, 0.04, 0.3)
    assert (h.ngram_min_order, h.ngram_max_order, h.ngram_chunk_tokens, h.ngram_mode) == (2, 9, 65536, "exact")
    assert (h.eval_stride, h.eval_batch_windows, h.rope_dims, h.xsa_last_n, h.bigram_vocab_size) == (64, 32, 16, 4, 1024)
    assert h.max_wallclock_seconds == 600.0 and h.export_weights == "ema" and h.ema_decay == 0.997
    assert h.grad_accum_steps(8) == 1 and h.grad_accum_steps(1) == 8


def test_env_parsing_by_type():
    h = tg.Hyperparameters.from_env({"SEED": "42", "EMA_DECAY": "0.99", "USE_SMEARGATE": "false", "LN_SCALE": "1",
                                     "NGRAM_ORDER_MULTS": "1,2,3,4,5,6,7,8", "DATA_PATH": "/d",
                                     "CONTROL_TENSOR_NAME_PATTERNS": "a, b"})
    assert h.seed == 42 and h.ema_decay == 0.99 and h.use_smeargate is False and h.ln_scale is True
    assert h.ngram_order_mults == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    assert h.data_path == "/d" and h.control_tensor_name_patterns == ("a", "b")
    assert h.run_id  # a fresh UUID when RUN_ID is absent


@pytest.mark.parametrize("env, words", [
    ({"SEED": "abc"}, ["SEED", "int"]),
    ({"USE_EMA": "yes"}, ["USE_EMA", "0, 1, true or false"]),
])
def test_unparseable_values_name_the_variable(env, words):
    with pytest.raises(ValueError) as e:
        tg.Hyperparameters.from_env(env)
    assert all(w in str(e.value) for w in words)


def test_typos_and_reference_only_settings_are_reported():
    with pytest.raises(tg.UserError) as e:
        tg.Hyperparameters.from_env({"NGRAM_MAXORDER": "5", "NGRAM_TWO_PASS": "1", "VE_ENABLED": "1"})
    msg = str(e.value)
    assert "did you mean NGRAM_MAX_ORDER" in msg and "NGRAM_TWO_PASS" in msg and "VE_ENABLED" in msg
    assert "\n" not in msg  # one line
    # a reference setting whose value matches what this script always does is accepted
    tg.Hyperparameters.from_env({"NGRAM_TWO_PASS": "0", "TIE_EMBEDDINGS": "1", "PATH": "/bin", "RANK": "0"})
    with pytest.raises(tg.UserError, match="ARTIFACT=x.ptz: renamed ARTIFACT_PATH"):  # one field names the artifact
        tg.Hyperparameters.from_env({"EVAL_ONLY": "1", "ARTIFACT": "x.ptz"})


@pytest.mark.parametrize("name, suggestion", [("NGRAM_MAX_ORDR", "NGRAM_MAX_ORDER"), ("EVAL_STRIDES", "EVAL_STRIDE"),
                                              ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"), ("USE_EMAS", "USE_EMA")])
def test_near_misses_of_real_settings_stay_errors(name, suggestion):
    with pytest.raises(tg.UserError, match=f"{name} is not a setting; did you mean {suggestion}"):
        tg.Hyperparameters.from_env({name: "1"})


def test_unrelated_names_with_our_prefixes_are_only_reported():
    env = {"USE_EXPERIMENTAL_CUDNN_V8_API": "1", "TRAIN_DIR": "/tmp", "EVAL_MODE": "x", "VAL_SOMETHING": "1",
           "TTT_SOMETHING_ELSE": "3", "SEED": "7"}
    h = tg.Hyperparameters.from_env(env)  # containers and CI set such names: they never stop a run
    assert h.seed == 7
    assert tg.check_unknown_settings(env) == ["EVAL_MODE", "TRAIN_DIR", "TTT_SOMETHING_ELSE",
                                              "USE_EXPERIMENTAL_CUDNN_V8_API", "VAL_SOMETHING"]


@pytest.mark.parametrize("env, field", [
    ({"NUM_HEADS": "0"}, "NUM_HEADS=0 must be > 0"),
    ({"MODEL_DIM": "-512"}, "MODEL_DIM=-512 must be > 0"),
    ({"ITERATIONS": "0"}, "ITERATIONS=0 must be > 0"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "MAX_WALLCLOCK_SECONDS=-1.0 must be >= 0"),
    ({"VAL_MAX_TOKENS": "-5"}, "VAL_MAX_TOKENS=-5 must be >= 0"),
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN=0 must be > 0"),
    ({"RUN_ID": "../escape"}, "RUN_ID='../escape' must be a plain file name"),
    ({"RUN_ID": "a b"}, "RUN_ID='a b'"),
])
def test_zero_negative_and_unsafe_values_name_the_field(env, field):
    with pytest.raises(tg.UserError) as e:  # not a bare ZeroDivisionError
        tg.Hyperparameters.from_env(env)
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, field", [
    ({"model_dim": 500}, "MODEL_DIM"),
    ({"num_kv_heads": 3}, "NUM_KV_HEADS"),
    ({"rope_dims": 17}, "ROPE_DIMS"),
    ({"eval_stride": 4096}, "EVAL_STRIDE"),
    ({"ngram_min_order": 5, "ngram_max_order": 3}, "NGRAM_MIN_ORDER"),
    ({"ngram_buckets": 1000}, "NGRAM_BUCKETS"),
    ({"export_weights": "best"}, "EXPORT_WEIGHTS"),
    ({"tokenizer_path": "tok.vocab"}, "TOKENIZER_PATH"),
    ({"eval_only": True, "artifact_path": ""}, "ARTIFACT_PATH"),
    ({"train_micro_batch_tokens": 1000}, "TRAIN_MICRO_BATCH_TOKENS"),
])
def test_validation_errors_name_the_fields(overrides, field):
    with pytest.raises(tg.UserError) as e:
        dataclasses.replace(tg.Hyperparameters(), **overrides).validate()
    assert field in str(e.value)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_record_batch_is_eight_micro_steps_over_the_world(world):
    h = tg.Hyperparameters()
    h.validate(world)
    assert h.micro_batch_tokens(world) == 98_304 and h.grad_accum_steps(world) == 8 // world


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_train_batch_tokens_alone_works_as_upstream(world):
    h = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "65536", "RUN_ID": "x"})
    h.validate(world)
    micro, accum = h.micro_batch_tokens(world), h.grad_accum_steps(world)
    assert accum == 8 // world and world * accum * micro == 65536 and micro % h.train_seq_len == 0


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_small_batches_use_fewer_micro_steps(world):
    h = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "8192", "TRAIN_SEQ_LEN": "256", "RUN_ID": "x"})
    h.validate(world)
    micro, accum = h.micro_batch_tokens(world), h.grad_accum_steps(world)
    assert world * accum * micro == 8192 and micro % 256 == 0 and accum <= max(8 // world, 1)
    small = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "8192", "RUN_ID": "x"})  # 4 sequences of 2048
    if world <= 4:
        small.validate(world)
        assert world * small.grad_accum_steps(world) * small.micro_batch_tokens(world) == 8192


def test_micro_batch_override():
    h = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "16384", "TRAIN_MICRO_BATCH_TOKENS": "4096", "RUN_ID": "x"})
    h.validate(2)
    assert h.micro_batch_tokens(2) == 4096 and h.grad_accum_steps(2) == 2


@pytest.mark.parametrize("env, world", [
    ({"TRAIN_BATCH_TOKENS": "8192"}, 8),  # 4 sequences of 2048 cannot cover 8 ranks
    ({"TRAIN_BATCH_TOKENS": "10000", "TRAIN_SEQ_LEN": "256"}, 2),
    ({"TRAIN_BATCH_TOKENS": "786432"}, 5),
    ({"TRAIN_BATCH_TOKENS": "12288", "TRAIN_MICRO_BATCH_TOKENS": "4096"}, 2),
])
def test_impossible_batch_proposes_values_that_work(env, world):
    h = tg.Hyperparameters.from_env(dict(env, RUN_ID="x"))
    with pytest.raises(tg.UserError) as e:
        h.validate(world)
    msg = str(e.value)
    assert f"WORLD_SIZE={world}" in msg and "TRAIN_BATCH_TOKENS=" in msg
    proposals = [int(v) for v in re.findall(r"use TRAIN_BATCH_TOKENS=(\d+)", msg) + re.findall(r" or (\d+)", msg)]
    assert proposals
    for value in proposals:  # every proposed batch validates on the same world size
        dataclasses.replace(h, train_batch_tokens=value).validate(world)


def test_every_field_is_logged_once_sorted():
    h = tg.Hyperparameters(run_id="r")
    lines = h.log_lines()
    names = [line.split()[1].split(":")[0] for line in lines]
    assert names == sorted(f.name for f in dataclasses.fields(h))
    assert "hparam ngram_order_mults:0.3,0.3,0.97,2.0,2.0,2.0,2.0,2.0,2.0,2.0,2.0" in lines
    assert "hparam use_ema:1" in lines


def test_import_has_no_side_effects(tmp_path):
    import subprocess
    import sys
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); import train_gpt; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code, str(tg.Path(tg.__file__).parent)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and not out.stderr


def run_sh_cpu_exports() -> dict:
    """run.sh's CPU branch (after the GPU branch's `fi`): every `export NAME=${NAME:-default}` or NAME=value."""
    cpu_branch = (ROOT / "run.sh").read_text(encoding="utf-8").split("\nfi\n")[-1]
    exports = " ".join(line.split("#")[0] for line in cpu_branch.splitlines() if line.startswith("export "))
    pairs = re.findall(r"(\w+)=(?:\$\{\1:-([^}]*)\}|([^\s$]\S*))", exports)
    return {name: default or value for name, default, value in pairs}


def test_run_sh_cpu_branch_exports_the_toolkit_demo_config():
    exported = run_sh_cpu_exports()
    assert len(exported) >= 20 and exported["DEVICE"] == "cpu"  # the parser sees the whole branch
    assert exported == CPU_DEMO_ENV


def test_cpu_demo_config_is_a_valid_configuration():
    h = tg.Hyperparameters.from_env(dict(CPU_DEMO_ENV, RUN_ID="demo"))
    assert (h.num_layers, h.model_dim, h.iterations, h.max_wallclock_seconds) == (4, 128, 200, 0.0)
    assert h.train_batch_tokens // h.train_micro_batch_tokens == 2  # 2 micro-steps on one process
