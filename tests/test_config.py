"""Hyperparameters: env parsing, unknown settings, validation messages, logging. Run: python3 -m pytest tests/test_config.py"""
import dataclasses

import pytest

import train_gpt as tg


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
    with pytest.raises(ValueError) as e:
        tg.Hyperparameters.from_env({"NGRAM_MAXORDER": "5", "NGRAM_TWO_PASS": "1"})
    msg = str(e.value)
    assert "did you mean NGRAM_MAX_ORDER" in msg and "NGRAM_TWO_PASS" in msg
    # a reference setting whose value matches what this script always does is accepted
    tg.Hyperparameters.from_env({"NGRAM_TWO_PASS": "0", "TIE_EMBEDDINGS": "1", "PATH": "/bin", "RANK": "0"})


@pytest.mark.parametrize("overrides, field", [
    ({"model_dim": 500}, "MODEL_DIM"),
    ({"num_kv_heads": 3}, "NUM_KV_HEADS"),
    ({"rope_dims": 17}, "ROPE_DIMS"),
    ({"eval_stride": 4096}, "EVAL_STRIDE"),
    ({"ngram_min_order": 5, "ngram_max_order": 3}, "NGRAM_MIN_ORDER"),
    ({"ngram_buckets": 1000}, "NGRAM_BUCKETS"),
    ({"export_weights": "best"}, "EXPORT_WEIGHTS"),
    ({"tokenizer_path": "tok.vocab"}, "TOKENIZER_PATH"),
    ({"eval_only": True}, "ARTIFACT"),
    ({"train_micro_batch_tokens": 1000}, "TRAIN_MICRO_BATCH_TOKENS"),
])
def test_validation_errors_name_the_fields(overrides, field):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(tg.Hyperparameters(), **overrides).validate()
    assert field in str(e.value)


def test_world_size_must_divide_the_batch():
    h = tg.Hyperparameters()
    for world in (1, 2, 4, 8):
        h.validate(world)
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        h.validate(3)
    with pytest.raises(ValueError, match="WORLD_SIZE=16"):
        h.validate(16)


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
