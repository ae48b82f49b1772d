"""Every evaluation runs through the compiled module (`model(x)`): dynamo traces the eval batches (one graph,
fixed shapes), the TTT pass traces its scoring and training steps, and inductor compiles the eval forward on CPU.

Run: python3 -m pytest tests/test_eval_compile.py -q
"""
import functools

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import train_gpt as tg
from conftest import RT1, main_in_process, random_stream, random_tables, settings_env, tiny_run_env


class Recorder:
    """A dynamo backend that records every graph it is given and counts the calls into compiled code."""

    def __init__(self, inner="eager"):
        self.graphs, self.calls, self.inner = [], 0, inner

    def __call__(self, gm, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        compiled = gm.forward if self.inner == "eager" else lookup_backend(self.inner)(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)
        return run


def gpt_and_val(tiny, n=600, **overrides):
    h = tiny(vocab_size=64, eval_seq_len=32, eval_stride=8, eval_batch_windows=4, ngram_chunk_tokens=128,
             ngram_audit_positions=16, ngram_log_every=0, ttt_chunk_tokens=128, ttt_batch_seqs=3, ttt_epochs=1,
             ttt_lr=0.05, ttt_log_every=0, **overrides)
    torch.manual_seed(0)
    return h, tg.build_model(h), tg.ValData(random_stream(n, 64, 2), random_tables(64))


def num_batches(h, n):
    windows = tg.plan_windows(n, h.eval_seq_len, h.eval_stride)
    return sum(-(-len(c) // h.eval_batch_windows) for _, _, c in tg.group_by_chunk(windows, h.ngram_chunk_tokens))


def test_eval_batches_are_traced_by_dynamo_in_one_graph(tiny):
    h, model, val = gpt_and_val(tiny)
    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=False)
    got = tg.roundtrip_eval(compiled, val, h, RT1)  # round trip + n-gram: one pass
    assert len(rec.graphs) == 1 and rec.calls == num_batches(h, val.num_targets)
    assert (h.eval_batch_windows, h.eval_seq_len) in rec.graphs[0]
    tg.sliding_eval(compiled, val, h, RT1)  # in-loop validation: same graph, no recompile
    assert len(rec.graphs) == 1 and rec.calls > num_batches(h, val.num_targets)
    eager = tg.roundtrip_eval(model, val, h, RT1)
    for name in ("model", "ngram"):
        assert got[name].loss == pytest.approx(eager[name].loss, rel=1e-6)


def test_ttt_pass_scores_and_trains_through_the_compiled_module(tiny):
    h, model, val = gpt_and_val(tiny, n=500, ngram_enabled=False)
    torch._dynamo.reset()
    rec = Recorder("aot_eager")  # AOT autograd: training must not touch tensors made under inference_mode
    got = tg.ttt_eval(model, val, h, RT1, lambda m: torch.compile(m, backend=rec, fullgraph=True, dynamic=False))
    assert len(rec.graphs) == 2  # the scoring graph and the training graph, each with one fixed shape
    assert rec.calls > num_batches(h, val.num_targets) + 3
    eager = tg.ttt_eval(model, val, h, RT1)
    assert got["model"].loss == pytest.approx(eager["model"].loss, rel=1e-5)
    assert got["model"].loss < tg.sliding_eval(model, val, h, RT1).loss


@pytest.mark.slow  # inductor compiles C++ kernels (it starts the compiler)
def test_eval_forward_compiles_fullgraph_with_inductor_on_cpu(tiny):
    h, model, val = gpt_and_val(tiny, n=200)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    got = tg.sliding_eval(compiled, val, h, RT1)
    want = tg.sliding_eval(model, val, h, RT1)
    assert (got.tokens, got.bytes) == (want.tokens, want.bytes)
    assert got.loss == pytest.approx(want.loss, rel=1e-4)


REAL = {"compile": torch.compile, "train": tg.train, "with_attention": tg.with_attention}  # before any patch


def graphs_after_training(tiny_corpus, tmp_path, monkeypatch, **overrides):
    """(graphs compiled by training, graphs compiled after it) of a whole run (main) with COMPILE=1, every
    torch.compile given a recording backend (the attention probe compiles with the eager backend). 8 steps, QAT from
    step 4 (as late QAT in a record run starts after the last periodic validation); the warm-up compiles the plain
    and the QAT graph."""
    run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # each run its own log and artifact
    run_dir.mkdir()
    env = tiny_run_env(tiny_corpus, run_dir, COMPILE="1", ITERATIONS="8", WARMUP_STEPS="2", QAT_ENABLED="1",
                       QAT_TIME_FRAC="0.5", VAL_MAX_TOKENS="512", NGRAM_AUDIT_POSITIONS="8", NGRAM_LOG_EVERY="0",
                       **settings_env(overrides))
    rec, at_end = Recorder(), []
    monkeypatch.setattr(torch, "compile", functools.partial(REAL["compile"], backend=rec))

    def train(*args, **kwargs):
        result = REAL["train"](*args, **kwargs)
        at_end.append(len(rec.graphs))
        return result

    monkeypatch.setattr(tg, "train", train)
    monkeypatch.setattr(tg, "with_attention", lambda rt, h: REAL["with_attention"](rt, h, compile_backend="eager"))
    torch._dynamo.reset()
    assert main_in_process(env, monkeypatch) == 0
    return at_end[0], len(rec.graphs) - at_end[0]


@pytest.mark.slow  # three short training runs under torch.compile
def test_after_training_no_graph_is_compiled_but_the_evaluations(tiny_corpus, tmp_path, monkeypatch):
    """No validation after the last step by default (nothing uses its score) and QAT switched off when training ends:
    after training at most the evaluation's graph is compiled (the model rebuilt from the artifact; dynamo reuses an
    eval-mode graph of the same shapes when one exists)."""
    during, after = graphs_after_training(tiny_corpus, tmp_path, monkeypatch, val_loss_every=4)
    assert (during, after) == (3, 0)  # plain, QAT, the step-4 validation's eval graph; the evaluation reuses it
    during, after = graphs_after_training(tiny_corpus, tmp_path, monkeypatch, val_loss_every=0)
    assert (during, after) == (2, 1)  # the evaluation's graph
    during, after = graphs_after_training(tiny_corpus, tmp_path, monkeypatch, val_loss_every=0,
                                          val_last_step=True)
    assert (during, after) == (2, 1)  # the last validation's graph, and the evaluation reuses it (QAT is off)
