"""The one test toolkit: the tiny configurations, a tiny real model, a tokenizer trained by data/make_dataset.py,
synthetic streams and byte tables, and the subprocess helpers for whole runs. Test modules and workers import
helpers from here only, never from each other.

Two tiers. `python3 -m pytest` runs the fast tier (in-process tests, for development); `python3 -m pytest --full`
runs everything, as CI does (.ci/run): also the tests marked `slow`, i.e. every test that starts a process (the
script, torchrun, a tool's command line), compiles with inductor or runs the README's commands."""
import dataclasses
import functools
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import demo_config  # noqa: E402
import train_gpt  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full suite (CI): also the slow tier (processes, torchrun, inductor, README commands)")


def pytest_collection_modifyitems(config, items):
    """Without --full, the slow tier is deselected (counted as `deselected` in pytest's summary)."""
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def fast_tier_starts_no_process(request, monkeypatch):
    """The tier rule, enforced: a test outside the slow tier that starts a process fails, naming the marker."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r}): mark it @pytest.mark.slow")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def pytest_report_header(config):
    return ("tier: full (--full)" if config.getoption("--full") else
            "tier: fast (tests marked slow are deselected; python3 -m pytest --full runs everything, as CI does)")


CPU = torch.device("cpu")
RT1 = train_gpt.single_process_runtime()  # one process on the CPU; dataclasses.replace(RT1, ...) for variants

# ------------------------------------------------------------------------------------------- configurations

# The tiny configuration (Hyperparameters fields): 2 layers, dim 64, 4 heads / 2 KV heads, vocab 128, seq 32.
TINY_SHAPE = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, rope_dims=8, xsa_last_n=1,
                  bigram_vocab_size=64, bigram_dim=16, train_seq_len=32, eval_seq_len=32, eval_stride=8,
                  eval_batch_windows=4, train_batch_tokens=256, train_micro_batch_tokens=128, ngram_chunk_tokens=64,
                  device="cpu", compile="0")
# In-process tests also fix the run: 6 steps, no wall clock, no periodic validation.
TINY = dict(TINY_SHAPE, warmup_steps=2, iterations=6, max_wallclock_seconds=0.0, val_loss_every=0, run_id="test")
# On top of TINY_SHAPE for whole runs and the tools (script, torchrun, preflight, benchmarks): sequences of 64.
TINY_RUN = dict(train_seq_len=64, eval_seq_len=64, eval_stride=32, eval_batch_windows=8, train_batch_tokens=1024,
                train_micro_batch_tokens=512, ngram_chunk_tokens=512)
CPU_DEMO_ENV = demo_config.CPU_DEMO_ENV  # run.sh's CPU branch exports exactly these (tests/test_config.py)


def tiny_hparams(**overrides):
    """A few-second CPU configuration: TINY with `overrides`."""
    return train_gpt.Hyperparameters(**{**TINY, **overrides})


@pytest.fixture
def tiny():
    return tiny_hparams


@pytest.fixture
def tg():
    return train_gpt


@pytest.fixture
def small_h(tmp_path):
    """TINY for export: threshold 256 keeps the control tensors and bigram projection float and sends bank slices to
    int6 rows; zstd at level 3 (fast) where ARTIFACT_CODEC=zstd; the artifact under tmp_path."""
    return tiny_hparams(keep_float_max_numel=256, zstd_level=3, artifact_path=str(tmp_path / "model.int6.ptz"))


@pytest.fixture
def one_thread():
    """One intra-op thread for a tool run in-process, as its command line runs in the tests (OMP_NUM_THREADS=1):
    far less contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings_env(fields: dict) -> dict:
    """Hyperparameters fields as the environment variables the script reads."""
    return {name.upper(): str(value) for name, value in fields.items()}


def tiny_env(**extra) -> dict:
    """Environment for a subprocess (script or tool) with TINY_SHAPE + TINY_RUN: no inherited rank or run settings."""
    drop = ("NGRAM_", "TRAIN_", "EVAL_", "USE_", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(settings_env({**TINY_SHAPE, **TINY_RUN}), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tiny_run_env(tiny_corpus, tmp_path, **extra):
    """tiny_env for a 30-step run of train_gpt.py on the tiny corpus, logs and artifact under tmp_path."""
    data, tok, vocab = tiny_corpus
    env = tiny_env(DATA_PATH=data, TOKENIZER_PATH=tok, VOCAB_SIZE=str(vocab), EVAL_STRIDE="16", ITERATIONS="30",
                   WARMUP_STEPS="2", WARMDOWN_ITERS="10", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="15",
                   TRAIN_LOG_EVERY="5", VAL_MAX_TOKENS="2048", NGRAM_AUDIT_POSITIONS="32", MATRIX_LR="0.02",
                   SWA_EVERY="2", RUN_ID="e2e",
                   LOG_DIR=str(tmp_path / "logs"), ARTIFACT_PATH=str(tmp_path / "model.int6.ptz"))
    env.update(extra)
    return env


def run_script(env, nproc=1, timeout=600):
    """train_gpt.py in a subprocess (torchrun when nproc > 1), started in LOG_DIR's parent folder."""
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    return subprocess.run(cmd, env=env, cwd=env["LOG_DIR"].rsplit("/", 1)[0], capture_output=True, text=True,
                          timeout=timeout)


def main_in_process(env: dict, monkeypatch, cwd=None, main=None, argv=None) -> int:
    """train_gpt.main() (or a tool's `main(argv)`) in this process with exactly `env` as the environment, started in
    `cwd` (default LOG_DIR's parent folder); returns its exit code (its return value or the SystemExit code)."""
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd or env["LOG_DIR"].rsplit("/", 1)[0])
    try:
        return main(argv) if main else train_gpt.main() or 0
    except SystemExit as e:
        return e.code


def one_error_line(stderr: str, *words, alone=True, warnings=False) -> str:
    """The one `error: ` line on stderr, naming `words`, and no traceback. alone: stderr holds that line and nothing
    else (no blank line either), but for `warning:` lines where warnings=True; else other lines may surround it."""
    lines = [ln for ln in stderr.splitlines() if not (warnings and ln.startswith("warning:"))]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and (lines == errors or not alone), stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


class FakeClock:
    """A clock for train(clock=...) that advances `tick_s` seconds per reading (train reads it once before the first
    step and once after each)."""

    def __init__(self, tick_s: float):
        self.now, self.tick_s = 0.0, tick_s

    def __call__(self) -> float:
        self.now += self.tick_s
        return self.now


# ---------------------------------------------------------------------------------------- a fake CUDA device

class FakeCudaTransfers(TorchDispatchMode):
    """Host-to-CUDA copies on a CPU-only torch: while active, pinning and copies to a cuda device are recorded and
    done on the CPU instead (the result stays a CPU tensor), so host-side code paths for CUDA run in tests. Records
    ("pin",) and ("to_cuda", non_blocking, source pinned?) in order. Use with a `torch.device("cuda", 0)`."""

    def __init__(self, monkeypatch):
        super().__init__()
        monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)  # the device argument is checked lazily
        self.log, self.pinned = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.is_pinned.default:
            return args[0].untyped_storage().data_ptr() in self.pinned
        if func is torch.ops.aten._pin_memory.default:
            out = args[0].clone()
            self.pinned.add(out.untyped_storage().data_ptr())
            self.log.append(("pin",))
            return out
        if func is torch.ops.aten._to_copy.default and str(kwargs.get("device", "")).startswith("cuda"):
            src = args[0]
            pinned = src.untyped_storage().data_ptr() in self.pinned
            self.log.append(("to_cuda", bool(kwargs.get("non_blocking")), pinned))
            return src.clone()
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ the model

def tiny_model(h, seed=0):
    """The real GPT of train_gpt.build_model at h's (tiny) dimensions, on the CPU, seeded."""
    torch.manual_seed(seed)
    return train_gpt.build_model(h, RT1)


def muon_model(seed=0):
    """The real GPT at the optimizer tests' shapes: 3 layers (bank rows 6 and 3), dim 32, vocab 64, bigram 32x8."""
    h = tiny_hparams(num_layers=3, model_dim=32, vocab_size=64, bigram_vocab_size=32, bigram_dim=8)
    return tiny_model(h, seed)


TINY_LAYOUT = (4, 2, 16)  # heads, KV heads, head dim of the tiny configuration: the attention probes' shapes


def probed_runtime(candidates, use_compile=True, compile_backend="aot_eager"):
    """RT1 (with use_compile) after with_attention probed `candidates` at TINY_LAYOUT; compiled probes run under
    `compile_backend`."""
    h = tiny_hparams()
    assert (h.num_heads, h.num_kv_heads, h.head_dim) == TINY_LAYOUT
    rt = dataclasses.replace(RT1, use_compile=use_compile)
    return train_gpt.with_attention(rt, h, candidates=candidates, compile_backend=compile_backend)


def breaks_under_compile(q, k, v):
    """An attention backend that works eagerly but that torch.compile(fullgraph=True) refuses."""
    torch._dynamo.graph_break()
    return train_gpt.sdpa_attention(q, k, v)


class UniformLM(nn.Module):
    """Known distribution: uniform logits over the vocabulary, whatever the input (for the null n-gram tests)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dummy = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab) + 0 * self.dummy


def make_batches(steps=2, batch=8, seq=16, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g))
            for _ in range(steps)]


def train_steps(model, opt, batches, mus=(0.9, 0.95), scales=(1.0, 0.5)):
    """The training loop's order: zero_grad, forward/backward, momentum + lr scale, (no clipping), step."""
    for (x, y), mu, s in zip(batches, mus, scales):
        opt.zero_grad()
        model(x, y).backward()
        opt.set_muon_momentum(mu)
        opt.set_lr_scale(s)
        opt.step()


def flat_params(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def rel_diffs(a: nn.Module, b: nn.Module, init: dict) -> dict:
    """Per parameter: max |a - b| / max |b - init| (difference relative to the size of the update)."""
    pa = dict(a.named_parameters())
    out = {}
    for n, p in b.named_parameters():
        moved = (p.detach().float() - init[n].float()).abs().max().item()
        out[n] = (pa[n].detach().float() - p.detach().float()).abs().max().item() / max(moved, 1e-12)
    return out


# ------------------------------------------------------------------------------------- streams and byte tables

def unit_tables(vocab):
    """Every token is one byte, nothing is a boundary: bpb = loss / ln 2."""
    return train_gpt.ByteTables(torch.ones(vocab, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool),
                                torch.zeros(vocab, dtype=torch.bool))


def random_tables(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return train_gpt.ByteTables(torch.randint(0, 4, (vocab,), generator=g).to(torch.int16),
                                torch.rand(vocab, generator=g) < 0.5, torch.rand(vocab, generator=g) < 0.1)


def random_stream(n_targets, vocab, seed=0):
    return torch.randint(0, vocab, (n_targets + 1,), generator=torch.Generator().manual_seed(seed))


def repeating_stream(n_targets, vocab, period=17, seed=0):
    """A stream the tiny model can learn within a few steps: one random phrase of `period` tokens, repeated."""
    return random_stream(period - 1, vocab, seed).repeat(n_targets // period + 1)[:n_targets + 1]


# ----------------------------------------------------------------------------------- tokenizer and corpus

@functools.cache
def load_data_script(name):
    """data/<name>.py as a module (data/ is not a package), loaded once."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tokenizer(docs, vocab_size):
    """A SentencePiece processor trained by data/make_dataset.py's own function (the sp1024 trainer options)."""
    import sentencepiece as spm
    model = load_data_script("make_dataset").train_tokenizer(docs, vocab_size, threads=1)
    return spm.SentencePieceProcessor(model_proto=model), model


WORDS = ("the of and to in is was for on that with as by at from his her are were it an be this which or had "
         "not but first one their also after new who they has two its time city state world year river music "
         "team school film season war house north south century county people part known game album series "
         "played including released became named located family group called number government").split()


def synthetic_documents(num_docs: int, seed: int = 0):
    """Deterministic English-like documents (word salad with some repetition) for tokenizer and shard tests."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sentences) + f" In {rng.randint(1800, 2020)}.")
    return docs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(data_path, tokenizer_path, vocab): a vocab-320 SentencePiece BPE + train/val shards with BOS per document."""
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_documents(1200)
    vocab = 320
    sp, model = train_tokenizer(docs, vocab)
    assert sp.vocab_size() == vocab
    (root / "tok.model").write_bytes(model)
    data = root / "tiny_sp"
    data.mkdir()
    encode = lambda ds: np.concatenate([np.array([1] + sp.encode(d), dtype=np.uint16) for d in ds])
    train_gpt.write_shard(data / "tiny_val_000000.bin", encode(docs[:150]))
    train_gpt.write_shard(data / "tiny_train_000000.bin", encode(docs[150:700]))
    train_gpt.write_shard(data / "tiny_train_000001.bin", encode(docs[700:]))
    return str(data), str(root / "tok.model"), vocab
