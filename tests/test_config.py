"""Hyperparameters: env parsing, unknown settings, validation messages, logging. Run: python3 -m pytest tests/test_config.py"""
import dataclasses
import os
import re

import pytest

import train_gpt as tg
import toolkit
from conftest import CPU_DEMO_ENV, ROOT, main_in_process, tiny_run_env


def readme_defaults() -> dict:
    """{field: default text} of README's settings table (rows that list as many defaults as variables)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| variable | default | meaning |"):].split("\n\n")[0].splitlines()[2:]
    out = {}
    for row in table:
        names, defaults = (re.split(r", | / ", cell.strip()) for cell in row.split("|")[1:3])
        if len(names) == len(defaults):
            out.update((n.strip("`").lower(), d.strip("`")) for n, d in zip(names, defaults))
    return out


def test_defaults_are_the_documented_record_configuration():
    """Defaults = the record configuration as README's settings table documents it (one row per variable)."""
    documented, h = readme_defaults(), tg.Hyperparameters()
    assert len(documented) >= 40, sorted(documented)
    fields = {f.name for f in dataclasses.fields(h)}
    assert set(documented) - {"run_id"} <= fields  # every documented variable is a setting
    for name, text in documented.items():
        if name == "run_id":
            assert text == "random" and tg.Hyperparameters.from_env({}).run_id != tg.Hyperparameters.from_env({}).run_id
            continue
        value = toolkit.format_setting(getattr(h, name))
        assert value == text or (re.fullmatch(r"[-\d.e]+", text) and float(value) == float(text)), (name, text)


def test_env_parsing_by_type():
    h = tg.Hyperparameters.from_env({"SEED": "42", "EMA_DECAY": "0.99", "SMEARGATE_ENABLED": "false", "LN_SCALE": "1",
                                     "NGRAM_ORDER_MULTS": "1,2,3,4,5,6,7,8", "DATA_PATH": "/d",
                                     "CONTROL_TENSOR_NAME_PATTERNS": "a, b"})
    assert h.seed == 42 and h.ema_decay == 0.99 and h.smeargate_enabled is False and h.ln_scale is True
    assert h.ngram_order_mults == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    assert h.data_path == "/d" and h.control_tensor_name_patterns == ("a", "b")
    assert h.run_id  # a fresh UUID when RUN_ID is absent


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


# ---- every message of a bad setting, in one table: Hyperparameters.from_env(env).validate(world) -------------------
# (tests/test_user_errors.py proves once, through main() and a real process, that such an error is one line, exit 2,
# nothing written)

SETTING_ERRORS = [  # (env, world size, words of the one-line message)
    ({"SEED": "abc"}, 1, ["SEED", "int"]),
    ({"EMA_ENABLED": "yes"}, 1, ["EMA_ENABLED", "0, 1, true or false"]),
    ({"NUM_HEADS": "0"}, 1, ["NUM_HEADS=0 must be > 0"]),
    ({"MODEL_DIM": "-512"}, 1, ["MODEL_DIM=-512 must be > 0"]),
    ({"ITERATIONS": "0"}, 1, ["ITERATIONS=0 must be > 0"]),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, 1, ["MAX_WALLCLOCK_SECONDS=-1.0 must be >= 0"]),
    ({"VAL_MAX_TOKENS": "-5"}, 1, ["VAL_MAX_TOKENS=-5 must be >= 0"]),
    ({"TRAIN_SEQ_LEN": "0"}, 1, ["TRAIN_SEQ_LEN=0 must be >= 2"]),
    ({"RUN_ID": "../escape"}, 1, ["RUN_ID='../escape' must be a plain file name"]),
    ({"RUN_ID": "a b"}, 1, ["RUN_ID='a b'"]),
    ({"MATRIX_LR": "-0.02"}, 1, ["MATRIX_LR=-0.02 must be >= 0"]),
    ({"BETA1": "1"}, 1, ["BETA1=1.0 must be in [0, 1)"]),
    ({"MUON_MOMENTUM": "1.5"}, 1, ["MUON_MOMENTUM=1.5 must be in [0, 1)"]),
    ({"EMA_DECAY": "1"}, 1, ["EMA_DECAY=1.0 must be in (0, 1)"]),
    ({"SEED": str(2**32)}, 1, ["SEED=4294967296 must be in [0, 4294967295]"]),
    ({"GPTQ_CALIB_SEED": "-1"}, 1, ["GPTQ_CALIB_SEED=-1"]),
    ({"VOCAB_SIZE": "70000"}, 1, ["VOCAB_SIZE=70000 must be in [2, 65536]"]),
    ({"ZSTD_LEVEL": "23"}, 1, ["ZSTD_LEVEL=23 must be in [1, 22]"]),
    ({"GPTQ_DAMP": "1e-6"}, 1, ["GPTQ_DAMP=1e-06 must be >= 0.0001"]),
    ({"GPTQ_CALIB_TEMPERATURE": "1e-40"}, 1, ["GPTQ_CALIB_TEMPERATURE=1e-40 must be >= 0.001"]),
    ({"NGRAM_ORDER_MULTS": "1,nan,2"}, 1, ["NGRAM_ORDER_MULTS=1.0,nan,2.0 must each be >= 0"]),
    ({"INT6_CLIP_CANDIDATES": "0.99,1.5"}, 1, ["INT6_CLIP_CANDIDATES=0.99,1.5 must each be in (0, 1]"]),
    ({"NGRAM_ALPHA_MIN": "0.8", "NGRAM_ALPHA_MAX": "0.5"}, 1, ["NGRAM_ALPHA_MIN=0.8 must be <= NGRAM_ALPHA_MAX=0.5"]),
    ({"TRAIN_LOG_EVERY": "0"}, 1, ["TRAIN_LOG_EVERY=0 must be > 0"]),
    ({"MLP_MULT": "0.001"}, 1, ["MLP_MULT=0.001 x MODEL_DIM=512 must give an MLP of at least 1 unit"]),
    ({"MODEL_DIM": "500"}, 1, ["MODEL_DIM"]),
    ({"NUM_KV_HEADS": "3"}, 1, ["NUM_KV_HEADS"]),
    ({"ROPE_DIMS": "17"}, 1, ["ROPE_DIMS"]),
    ({"EVAL_STRIDE": "4096"}, 1, ["EVAL_STRIDE"]),
    ({"NGRAM_MIN_ORDER": "5", "NGRAM_MAX_ORDER": "3"}, 1, ["NGRAM_MIN_ORDER"]),
    ({"NGRAM_BUCKETS": "1000"}, 1, ["NGRAM_BUCKETS"]),
    ({"NGRAM_MIXER": "fixed"}, 1, ["NGRAM_MIXER"]),
    ({"NGRAM_MIXER_PRIOR": "1.0"}, 1, ["NGRAM_MIXER_PRIOR"]),
    ({"NGRAM_MIXER_SMOOTH": "0"}, 1, ["NGRAM_MIXER_SMOOTH"]),
    ({"NGRAM_MIXER_GUARD": "0"}, 1, ["NGRAM_MIXER_GUARD"]),
    ({"EXPORT_WEIGHTS": "best"}, 1, ["EXPORT_WEIGHTS"]),
    ({"TOKENIZER_PATH": "tok.vocab"}, 1, ["TOKENIZER_PATH"]),
    ({"EVAL_ONLY": "1", "ARTIFACT_PATH": "out/"}, 1, ["ARTIFACT_PATH=", "must name a file"]),
    ({"TRAIN_MICRO_BATCH_TOKENS": "1000"}, 1, ["TRAIN_MICRO_BATCH_TOKENS"]),
    ({"TRAIN_BATCH_TOKENS": "1000"}, 1, ["TRAIN_BATCH_TOKENS=1000", "use TRAIN_BATCH_TOKENS="]),
    ({"NGRAM_MAX_ORDR": "5"}, 1, ["NGRAM_MAX_ORDR is not a setting; did you mean NGRAM_MAX_ORDER?"]),
]


@pytest.mark.parametrize("env, world, words", SETTING_ERRORS, ids=[" ".join(f"{k}={v}" for k, v in env.items())
                                                                    for env, _, _ in SETTING_ERRORS])
def test_a_bad_setting_is_one_line_naming_the_setting(env, world, words):
    with pytest.raises(ValueError) as e:  # a UserError (or the parser's ValueError), never ZeroDivisionError & co.
        tg.Hyperparameters.from_env(dict(env, RUN_ID=env.get("RUN_ID", "x"))).validate(world)
    message = str(e.value)
    assert all(w in message for w in words) and "\n" not in message, message


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("env, total", [({}, 786_432), ({"TRAIN_BATCH_TOKENS": "65536"}, 65_536)],
                         ids=["record batch", "TRAIN_BATCH_TOKENS alone, as upstream"])
def test_a_batch_is_eight_micro_steps_over_the_world(env, total, world):
    h = tg.Hyperparameters.from_env(dict(env, RUN_ID="x"))
    h.validate(world)
    micro, accum = h.micro_batch_tokens(world), h.grad_accum_steps(world)
    assert h.train_batch_tokens == total
    assert accum == 8 // world and world * accum * micro == total and micro % h.train_seq_len == 0


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


def test_every_field_is_logged_once_sorted_and_reads_back_as_the_same_setting():
    h = tg.Hyperparameters(run_id="r", ngram_order_mults=(0.5,) * 8, ema_enabled=False, export_weights="raw",
                           matrix_lr=0.0125, data_path="/some/where")
    lines = h.log_lines()
    names = [line.split()[1].split(":")[0] for line in lines]
    assert names == sorted(f.name for f in dataclasses.fields(h))
    env = dict(line.removeprefix("hparam ").split(":", 1) for line in lines)
    assert tg.Hyperparameters.from_env({k.upper(): v for k, v in env.items()}) == h  # a log line is the setting


def test_import_has_no_side_effects(tmp_path, monkeypatch, capsys):
    """Importing a fresh copy of the script (in an empty folder) prints nothing, writes nothing, starts nothing."""
    import importlib.util
    import sys
    import torch.distributed as dist
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("train_gpt_fresh_import", ROOT / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the class runs
    spec.loader.exec_module(module)
    assert capsys.readouterr() == ("", "") and list(tmp_path.iterdir()) == []
    assert not dist.is_initialized()


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
    h.validate(1)
    assert h.grad_accum_steps(1) == 2  # 2 micro-steps on one process


# ---- typos of any setting; quiet for what containers, schedulers and CI set --------------------------------------

@pytest.mark.parametrize("name, suggestion", [
    ("NGRAM_MAX_ORDR", "NGRAM_MAX_ORDER"), ("EVAL_STRIDES", "EVAL_STRIDE"), ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"),
    ("EMA_ENABLEDS", "EMA_ENABLED"), ("NUM_LAYER", "NUM_LAYERS"), ("SEEDS", "SEED"), ("DATA_PAHT", "DATA_PATH"),
    ("MATRIXLR", "MATRIX_LR"), ("GPTQ_DAMPING", "GPTQ_DAMP"), ("LOGDIR", "LOG_DIR"), ("ITERATION", "ITERATIONS"),
    ("BETA_1", "BETA1"), ("num_layers", "NUM_LAYERS"), ("seed", "SEED"), ("Model_Dim", "MODEL_DIM"),
])
def test_near_misses_of_every_setting_are_errors_whatever_the_prefix(name, suggestion):
    with pytest.raises(tg.UserError, match=f"{name} is not a setting; did you mean {suggestion}\\?"):
        tg.Hyperparameters.from_env({name: "42"})

@pytest.mark.parametrize("old, new", [("USE_EMA", "EMA_ENABLED"), ("USE_LATE_QAT", "QAT_ENABLED"),
                                      ("USE_TTT", "TTT_ENABLED"), ("USE_SMEARGATE", "SMEARGATE_ENABLED"),
                                      ("USE_VALUE_RESIDUAL", "VALUE_RESIDUAL_ENABLED"),
                                      ("USE_GATED_ATTENTION", "GATED_ATTENTION_ENABLED")])
def test_the_old_switch_names_are_refused_naming_the_new_one(old, new):
    for value in ("0", "1"):  # never accepted, not even with the value the new switch has by default
        with pytest.raises(tg.UserError, match=f"^unknown or unsupported settings in the environment: "
                                               f"{old}={value}: renamed {new}$"):
            tg.Hyperparameters.from_env({old: value})


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


def test_unknown_names_with_our_prefixes_are_logged_and_what_containers_set_is_quiet(tiny_corpus, tmp_path,
                                                                                      monkeypatch):
    """Neither stops a run: names that only share one of our prefixes are logged once each as `env_ignored`, what
    containers, schedulers and CI set is not even logged (it is no near-miss and shares no prefix)."""
    ours = {"USE_EXPERIMENTAL_CUDNN_V8_API": "1", "TRAIN_DIR": "/tmp", "EVAL_MODE": "x", "VAL_SOMETHING": "1",
            "TTT_SOMETHING_ELSE": "3"}
    containers = dict.fromkeys(CONTAINER_AND_CI_ENV, "1")
    assert tg.Hyperparameters.from_env({**containers, **ours, "SEED": "7"}).seed == 7  # nothing refused
    for key in ("PATH", "HOME", "PYTHONPATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "TMPDIR", "PWD", "CUDA_VISIBLE_DEVICES"):
        del containers[key]  # the run below must still find python's packages and this folder
    containers.update(dict.fromkeys(("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK"), "0"))  # one process
    tok = tmp_path / "not_a_tokenizer.model"
    tok.write_text("x")  # the run stops at the tokenizer, after its header and the env_ignored lines
    env = tiny_run_env(tiny_corpus, tmp_path, TOKENIZER_PATH=str(tok), **containers, **ours)
    assert main_in_process(env, monkeypatch, tmp_path) == 2
    log = (tmp_path / "logs" / "e2e.txt").read_text().splitlines()
    assert [line for line in log if line.startswith("env_ignored ")] == [f"env_ignored name:{n}" for n in sorted(ours)]


# ---- every numeric field: finite and in its range ---------------------------------------------------------------

NUMERIC_FIELDS = [f.name for f in dataclasses.fields(tg.Hyperparameters)
                  if str(f.type) in ("int", "float", "tuple[float, ...]")]
FLOAT_FIELDS = [f.name for f in dataclasses.fields(tg.Hyperparameters) if "float" in str(f.type)]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_before_the_run(name, raw):
    with pytest.raises(tg.UserError, match=f"{name.upper()}="):
        tg.Hyperparameters.from_env({name.upper(): raw})


NEGATIVE_OK = {"ngram_entropy_center", "ngram_center_shift"}  # the seed rule's entropy center may sit below 0


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_every_numeric_field_is_range_checked(name):
    """Every numeric field has a range: -1 is refused naming it (beside NaN and inf, refused for every float),
    except where a negative value means something."""
    if name in NEGATIVE_OK:
        tg.Hyperparameters.from_env({name.upper(): "-1"})
        return
    with pytest.raises(tg.UserError, match=f"{name.upper()}=-1"):
        tg.Hyperparameters.from_env({name.upper(): "-1"})


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
