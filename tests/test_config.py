"""Hyperparameters: env parsing, unknown settings, validation messages, logging. Run: python3 -m pytest tests/test_config.py"""
import dataclasses
import os
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
    h = tg.Hyperparameters.from_env({"SEED": "42", "EMA_DECAY": "0.99", "SMEARGATE_ENABLED": "false", "LN_SCALE": "1",
                                     "NGRAM_ORDER_MULTS": "1,2,3,4,5,6,7,8", "DATA_PATH": "/d",
                                     "CONTROL_TENSOR_NAME_PATTERNS": "a, b"})
    assert h.seed == 42 and h.ema_decay == 0.99 and h.smeargate_enabled is False and h.ln_scale is True
    assert h.ngram_order_mults == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    assert h.data_path == "/d" and h.control_tensor_name_patterns == ("a", "b")
    assert h.run_id  # a fresh UUID when RUN_ID is absent


@pytest.mark.parametrize("env, words", [
    ({"SEED": "abc"}, ["SEED", "int"]),
    ({"EMA_ENABLED": "yes"}, ["EMA_ENABLED", "0, 1, true or false"]),
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
                                              ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"), ("EMA_ENABLEDS", "EMA_ENABLED")])
def test_near_misses_of_real_settings_stay_errors(name, suggestion):
    with pytest.raises(tg.UserError, match=f"{name} is not a setting; did you mean {suggestion}"):
        tg.Hyperparameters.from_env({name: "1"})


@pytest.mark.parametrize("old, new", [("USE_EMA", "EMA_ENABLED"), ("USE_LATE_QAT", "QAT_ENABLED"),
                                      ("USE_TTT", "TTT_ENABLED"), ("USE_SMEARGATE", "SMEARGATE_ENABLED"),
                                      ("USE_VALUE_RESIDUAL", "VALUE_RESIDUAL_ENABLED"),
                                      ("USE_GATED_ATTENTION", "GATED_ATTENTION_ENABLED")])
def test_the_old_switch_names_are_refused_naming_the_new_one(old, new):
    for value in ("0", "1"):  # never accepted, not even with the value the new switch has by default
        with pytest.raises(tg.UserError, match=f"^unknown or unsupported settings in the environment: "
                                               f"{old}={value}: renamed {new}$"):
            tg.Hyperparameters.from_env({old: value})


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
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN=0 must be >= 2"),
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
    ({"ngram_mixer": "fixed"}, "NGRAM_MIXER"),
    ({"ngram_mixer_prior": 1.0}, "NGRAM_MIXER_PRIOR"),
    ({"ngram_mixer_smooth": 0.0}, "NGRAM_MIXER_SMOOTH"),
    ({"ngram_mixer_guard": 0.0}, "NGRAM_MIXER_GUARD"),
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
    assert "hparam ema_enabled:1" in lines


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


# ---- typos of any setting; quiet for what containers, schedulers and CI set --------------------------------------

@pytest.mark.parametrize("name, suggestion", [
    ("NUM_LAYER", "NUM_LAYERS"), ("SEEDS", "SEED"), ("DATA_PAHT", "DATA_PATH"), ("MATRIXLR", "MATRIX_LR"),
    ("GPTQ_DAMPING", "GPTQ_DAMP"), ("LOGDIR", "LOG_DIR"), ("ITERATION", "ITERATIONS"), ("BETA_1", "BETA1"),
    ("num_layers", "NUM_LAYERS"), ("seed", "SEED"), ("Model_Dim", "MODEL_DIM"),
])
def test_near_misses_of_every_setting_are_errors_whatever_the_prefix(name, suggestion):
    with pytest.raises(tg.UserError, match=f"{name} is not a setting; did you mean {suggestion}\\?"):
        tg.Hyperparameters.from_env({name: "42"})


# Variables set by Docker images (NVIDIA CUDA, PyTorch, Python), Kubernetes, SLURM, torchrun/torchelastic, GitHub
# Actions, GitLab, Jenkins, cloud GPU hosts, shells and common ML tooling.
CONTAINER_AND_CI_ENV = """
HOSTNAME PATH HOME USER SHELL TERM LANG LC_ALL PWD OLDPWD SHLVL LOGNAME TZ TMPDIR DISPLAY EDITOR PAGER _
CUDA_VERSION CUDA_HOME CUDA_PATH CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER CUDA_LAUNCH_BLOCKING CUDA_MODULE_LOADING
CUDA_CACHE_PATH CUDA_DEVICE_MAX_CONNECTIONS CUDNN_VERSION NV_CUDA_LIB_VERSION NV_CUDA_CUDART_VERSION NV_LIBNCCL_PACKAGE
NV_LIBNCCL_PACKAGE_VERSION NV_NVTX_VERSION NV_CUDNN_VERSION NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES
NVIDIA_REQUIRE_CUDA NVIDIA_PRODUCT_NAME NVARCH NCCL_VERSION NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_IB_DISABLE
NCCL_P2P_DISABLE NCCL_SOCKET_IFNAME NCCL_ASYNC_ERROR_HANDLING NCCL_BLOCKING_WAIT NCCL_NVLS_ENABLE NCCL_TIMEOUT
NCCL_ALGO NCCL_PROTO NCCL_IB_HCA OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS OMP_PROC_BIND KMP_AFFINITY
MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME
ROLE_WORLD_SIZE TORCHELASTIC_RESTART_COUNT TORCHELASTIC_MAX_RESTARTS TORCHELASTIC_RUN_ID TORCHELASTIC_USE_AGENT_STORE
TORCHELASTIC_ERROR_FILE TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT TORCH_DISTRIBUTED_DEBUG
TORCH_CPP_LOG_LEVEL TORCH_LOGS TORCH_COMPILE_DEBUG TORCHINDUCTOR_CACHE_DIR TORCHINDUCTOR_FX_GRAPH_CACHE TORCH_HOME
TORCH_CUDA_ARCH_LIST PYTORCH_CUDA_ALLOC_CONF PYTORCH_VERSION TRITON_CACHE_DIR TORCH_COMPILE_DISABLE
PYTHONPATH PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE PYTHONHASHSEED PYTHONIOENCODING PYTHONWARNINGS PYTHON_VERSION
PYTHON_SHA256 PIP_NO_CACHE_DIR PIP_DISABLE_PIP_VERSION_CHECK PIP_ROOT_USER_ACTION VIRTUAL_ENV CONDA_PREFIX
CONDA_DEFAULT_ENV LD_LIBRARY_PATH LIBRARY_PATH LD_PRELOAD CPATH PKG_CONFIG_PATH XDG_RUNTIME_DIR XDG_CACHE_HOME
SSH_CLIENT SSH_CONNECTION SSH_TTY SSH_AUTH_SOCK LS_COLORS DEBIAN_FRONTEND
KUBERNETES_SERVICE_HOST KUBERNETES_SERVICE_PORT KUBERNETES_SERVICE_PORT_HTTPS KUBERNETES_PORT KUBERNETES_PORT_443_TCP
KUBERNETES_PORT_443_TCP_ADDR KUBERNETES_PORT_443_TCP_PORT KUBERNETES_PORT_443_TCP_PROTO POD_NAME POD_NAMESPACE
POD_IP NODE_NAME JOB_COMPLETION_INDEX SLURM_JOB_ID SLURM_PROCID SLURM_LOCALID SLURM_NTASKS SLURM_NODEID
SLURM_JOB_NODELIST SLURM_CPUS_PER_TASK SLURM_ARRAY_TASK_ID SLURM_JOB_NAME
CI GITHUB_ACTIONS GITHUB_WORKFLOW GITHUB_RUN_ID GITHUB_RUN_NUMBER GITHUB_RUN_ATTEMPT GITHUB_JOB GITHUB_ACTION
GITHUB_ACTOR GITHUB_REPOSITORY GITHUB_EVENT_NAME GITHUB_SHA GITHUB_REF GITHUB_WORKSPACE GITHUB_ENV GITHUB_PATH
GITHUB_OUTPUT GITHUB_STEP_SUMMARY RUNNER_OS RUNNER_ARCH RUNNER_NAME RUNNER_TEMP RUNNER_TOOL_CACHE RUNNER_DEBUG
ImageOS ImageVersion ACTIONS_RUNNER_DEBUG GITLAB_CI CI_JOB_ID CI_PIPELINE_ID CI_COMMIT_SHA CI_PROJECT_DIR
BUILD_NUMBER JENKINS_URL WORKSPACE RUNPOD_POD_ID RUNPOD_GPU_COUNT RUNPOD_PUBLIC_IP VAST_CONTAINERLABEL PUBLIC_KEY
HF_HOME HF_TOKEN HF_HUB_CACHE HF_DATASETS_CACHE HF_HUB_ENABLE_HF_TRANSFER HF_HUB_OFFLINE TRANSFORMERS_CACHE
TOKENIZERS_PARALLELISM WANDB_API_KEY WANDB_PROJECT WANDB_MODE WANDB_DIR WANDB_RUN_ID WANDB_ENTITY
AWS_REGION AWS_DEFAULT_REGION GOOGLE_APPLICATION_CREDENTIALS HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy
no_proxy SSL_CERT_FILE REQUESTS_CA_BUNDLE MALLOC_ARENA_MAX XLA_FLAGS TF_CPP_MIN_LOG_LEVEL
""".split()


def test_what_containers_schedulers_and_ci_set_is_never_a_near_miss():
    env = dict.fromkeys(CONTAINER_AND_CI_ENV, "1")
    assert tg.Hyperparameters.from_env(env).seed == 1337  # nothing refused
    assert tg.check_unknown_settings(env) == []  # and none of them shares one of our prefixes


# ---- every numeric field: finite and in its range ---------------------------------------------------------------

NUMERIC_FIELDS = [f.name for f in dataclasses.fields(tg.Hyperparameters)
                  if str(f.type) in ("int", "float", "tuple[float, ...]")]
FLOAT_FIELDS = [f.name for f in dataclasses.fields(tg.Hyperparameters) if "float" in str(f.type)]


def test_every_numeric_field_has_a_range():
    assert sorted(tg.FIELD_RANGES) == sorted(NUMERIC_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_before_the_run(name, raw):
    with pytest.raises(tg.UserError, match=f"{name.upper()}="):
        tg.Hyperparameters.from_env({name.upper(): raw})


@pytest.mark.parametrize("name", [n for n in NUMERIC_FIELDS if not tg.FIELD_RANGES[n].startswith("(-inf")])
def test_negative_values_are_refused_where_the_range_is_not_negative(name):
    with pytest.raises(tg.UserError, match=f"{name.upper()}=-1"):
        tg.Hyperparameters.from_env({name.upper(): "-1"})


@pytest.mark.parametrize("env, message", [
    ({"MATRIX_LR": "-0.02"}, "MATRIX_LR=-0.02 must be >= 0"),
    ({"BETA1": "1"}, "BETA1=1.0 must be in [0, 1)"),
    ({"MUON_MOMENTUM": "1.5"}, "MUON_MOMENTUM=1.5 must be in [0, 1)"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 must be in (0, 1)"),
    ({"SEED": str(2**32)}, "SEED=4294967296 must be in [0, 4294967295]"),
    ({"GPTQ_CALIB_SEED": "-1"}, "GPTQ_CALIB_SEED=-1"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000 must be in [2, 65536]"),
    ({"ZSTD_LEVEL": "23"}, "ZSTD_LEVEL=23 must be in [1, 22]"),
    ({"GPTQ_DAMP": "1e-6"}, "GPTQ_DAMP=1e-06 must be >= 0.0001"),
    ({"GPTQ_CALIB_TEMPERATURE": "1e-40"}, "GPTQ_CALIB_TEMPERATURE=1e-40 must be >= 0.001"),
    ({"NGRAM_ORDER_MULTS": "1,nan,2"}, "NGRAM_ORDER_MULTS=1.0,nan,2.0 must each be >= 0"),
    ({"INT6_CLIP_CANDIDATES": "0.99,1.5"}, "INT6_CLIP_CANDIDATES=0.99,1.5 must each be in (0, 1]"),
    ({"NGRAM_ALPHA_MIN": "0.8", "NGRAM_ALPHA_MAX": "0.5"}, "NGRAM_ALPHA_MIN=0.8 must be <= NGRAM_ALPHA_MAX=0.5"),
    ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY=0 must be > 0"),
    ({"MLP_MULT": "0.001"}, "MLP_MULT=0.001 x MODEL_DIM=512 must give an MLP of at least 1 unit"),
])
def test_out_of_range_values_name_the_field_and_the_range(env, message):
    with pytest.raises(tg.UserError) as e:
        tg.Hyperparameters.from_env(env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_range_bounds_are_accepted():
    tg.Hyperparameters.from_env({"MATRIX_LR": "0", "BETA1": "0", "SEED": "4294967295", "QAT_TIME_FRAC": "1",
                                 "VOCAB_SIZE": "65536", "GPTQ_DAMP": "0.0001", "NGRAM_ENTROPY_CENTER": "-3"})


@pytest.mark.parametrize("path", ["", "out/", "out/.", "..", "."])
def test_artifact_path_must_name_a_file(path):
    with pytest.raises(tg.UserError, match="ARTIFACT_PATH=.* must name a file"):
        tg.Hyperparameters.from_env({"ARTIFACT_PATH": path})


def test_a_value_that_is_not_utf8_is_one_readable_error():
    raw = os.fsdecode(b"/data/caf\xe9")  # how Python hands over a Latin-1 byte in an environment variable
    with pytest.raises(tg.UserError) as e:
        tg.Hyperparameters.from_env({"DATA_PATH": raw})
    assert "DATA_PATH='/data/caf\\udce9' is not valid UTF-8" in str(e.value)
    str(e.value).encode("utf-8")  # the message itself can be printed and logged


# ---- score-then-update chunks that cannot fill a batch ----------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 8])
def test_small_chunks_are_refused_naming_their_cost(world):
    h = tg.Hyperparameters.from_env({"NGRAM_CHUNK_TOKENS": "64", "RUN_ID": "x"})  # 1 window of 64 targets
    with pytest.raises(tg.UserError) as e:
        h.validate(world)
    msg = str(e.value)
    assert f"NGRAM_CHUNK_TOKENS=64 gives each of WORLD_SIZE={world} ranks" in msg
    assert f"the pass would cost {32 * world:g}x the plain pass" in msg
    proposal = int(re.search(r"use NGRAM_CHUNK_TOKENS >= (\d+)", msg).group(1))
    assert proposal == 64 * 32 * world
    dataclasses.replace(h, ngram_chunk_tokens=proposal).validate(world)
    dataclasses.replace(h, ngram_enabled=False).validate(world)  # the setting of a pass that does not run


def test_small_ttt_chunks_are_refused_and_fewer_batch_windows_fit():
    h = tg.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "4096", "RUN_ID": "x"})
    h.validate(1)
    with pytest.raises(tg.UserError, match=r"TTT_CHUNK_TOKENS=4096 .* cost 4x .* or EVAL_BATCH_WINDOWS <= 8"):
        h.validate(8)
    dataclasses.replace(h, eval_batch_windows=8).validate(8)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_record_and_demo_chunks_fill_their_batches(world):
    tg.Hyperparameters(ttt_enabled=True).validate(world)
    if world == 1:
        tg.Hyperparameters.from_env(dict(CPU_DEMO_ENV, RUN_ID="demo", TTT_ENABLED="1", TTT_CHUNK_TOKENS="8192")).validate(1)
