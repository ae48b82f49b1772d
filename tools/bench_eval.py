"""Benchmark the one evaluation pass: round trip alone vs round trip + exact n-gram from the same logits.

  python3 tools/bench_eval.py                              # CPU, run.sh's demo model shape, 131,072 targets
  python3 tools/bench_eval.py --tokens 200000 --json -     # figures as JSON on stdout
  python3 tools/bench_eval.py --val-shards data/datasets/sample_sp1024 --json bench_eval.json

Builds a randomly initialized model of the given shape (eval cost does not depend on the weights), then times
scored_pass() of train_gpt.py with NGRAM_ENABLED=0 (the round trip alone: sliding windows, one forward per batch)
and with NGRAM_ENABLED=1 (the same pass plus the n-gram scorer on the same log-probabilities, chunked, with the
cache update after every chunk and the audit), --repeats times each, alternating, and reports medians and the
ratio (target <= 1.15). Because a shared machine drifts between runs, the n-gram work is also timed inside each
combined run (scorer calls incl. entropy and mixing, chunk updates, audit; synchronized timers): ratio_within_run =
pass time / (pass time - n-gram time), with cache lookups and updates reported separately. Tokens: a Zipf-like i.i.d. stream (many distinct long contexts: a hard case for the
exact cache) or the first --tokens targets of the val shards under --val-shards. Model compile is off (CPU).
An argument out of range, a model shape train_gpt.py refuses, missing or too few val shards, or --device cuda
without a GPU is one `error:` line, exit 2 (tools/toolkit.py).
"""
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from bench_ngram_cache import make_stream  # noqa: E402
import toolkit  # noqa: E402
from logparse import cli_parser, emit  # noqa: E402


def hparams(args, device) -> tg.Hyperparameters:
    """The flags as train_gpt settings, checked by its own validation (shape divisibility, stride <= seq_len)."""
    h = tg.Hyperparameters(
        vocab_size=args.vocab, num_layers=args.layers, model_dim=args.dim, num_heads=args.heads,
        num_kv_heads=args.kv_heads, xsa_last_n=min(2, args.layers), bigram_dim=32, eval_seq_len=args.seq_len,
        eval_stride=args.stride, eval_batch_windows=args.batch_windows, ngram_chunk_tokens=args.chunk,
        ngram_mixer=args.mixer, ngram_log_every=0, device=device.type, compile="0", run_id="bench_eval")
    h.validate(1)
    return h


def load_tokens(args) -> torch.Tensor:
    if not args.val_shards:
        return make_stream(args.tokens, args.vocab, "zipf", args.seed, torch.device("cpu"))
    files = tg.find_shards(args.val_shards, "val")
    tokens = torch.cat([torch.from_numpy(tg.read_shard(f, args.vocab).astype("int64")) for f in files])
    if tokens.numel() < args.tokens + 1:
        raise toolkit.ToolError(f"--val-shards {args.val_shards}: {tokens.numel() - 1} targets < --tokens "
                                f"{args.tokens}; lower --tokens")
    return tokens[:args.tokens + 1]


class Timers:
    """Synchronized timers around methods of one object (instance attributes shadow the class's methods)."""

    def __init__(self, obj, rt, names: dict):
        self.rt, self.seconds = rt, {key: 0.0 for key in names.values()}
        for name, key in names.items():
            setattr(obj, name, self._timed(getattr(obj, name), key))

    def _timed(self, fn, key):
        def run(*a, **kw):
            tg.synchronize(self.rt)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            tg.synchronize(self.rt)
            self.seconds[key] += time.perf_counter() - t0
            return out
        return run


def timed_pass(model, val, h, rt, ngram: bool) -> dict:
    """One scored_pass; with the n-gram scorer also the time inside it (scorer calls, chunk updates, audit report)
    and inside its cache (lookups, updates), measured in the same run."""
    timers = []
    make = tg.make_ngram_scorer

    def make_timed(tokens, hh, rt_):
        scorer = make(tokens, hh, rt_)
        timers.append(Timers(scorer.cache, rt, {"stats": "lookup", "update": "update"}))
        t = Timers(scorer, rt, {"after_chunk": "ngram", "audit_report": "ngram"})
        call = t._timed(scorer.__call__, "ngram")  # calls look __call__ up on the type: time it through a subclass
        scorer.__class__ = type("TimedNgramScorer", (type(scorer),), {"__call__": lambda self, *a: call(*a)})
        timers.append(t)
        return scorer

    tg.make_ngram_scorer = make_timed
    try:
        t0 = time.perf_counter()
        res = tg.scored_pass(model, val, dataclasses.replace(h, ngram_enabled=ngram), rt)
        seconds = time.perf_counter() - t0
    finally:
        tg.make_ngram_scorer = make
    out = {"seconds": seconds, "bpb": {k: r.bpb for k, r in res.items()}}
    for t in timers:
        out.update({f"{k}_s": v for k, v in t.seconds.items()})
    return out


def run(args) -> dict:
    device = toolkit.torch_device(args.device)
    h = hparams(args, device)
    rt = tg.single_process_runtime(device)
    torch.manual_seed(args.seed)
    model = tg.build_model(h, rt)
    tokens = load_tokens(args)
    val = tg.ValData(tokens, tg.ByteTables(torch.ones(args.vocab, dtype=torch.int16),
                                           torch.zeros(args.vocab, dtype=torch.bool),
                                           torch.zeros(args.vocab, dtype=torch.bool)))
    warm = tg.ValData(tokens[:min(tokens.numel(), 4 * args.seq_len + 1)], val.tables)
    timed_pass(model, warm, h, rt, True)  # first-call costs (allocator, lazy imports) outside the clock
    alone, together = [], []
    for _ in range(args.repeats):
        alone.append(timed_pass(model, val, h, rt, False))
        together.append(timed_pass(model, val, h, rt, True))
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    t_alone, t_both = med(alone, "seconds"), med(together, "seconds")
    lookup, update = med(together, "lookup_s"), med(together, "update_s")
    within = statistics.median(r["seconds"] / (r["seconds"] - r["ngram_s"]) for r in together)
    return {"device": str(rt.device), "threads": torch.get_num_threads(), "tokens": args.tokens,
            "model": {"layers": args.layers, "dim": args.dim, "vocab": args.vocab, "seq_len": args.seq_len,
                      "stride": args.stride, "batch_windows": args.batch_windows,
                      "params": sum(p.numel() for p in model.parameters())},
            "chunk": args.chunk, "mixer": args.mixer, "repeats": args.repeats, "roundtrip_s": round(t_alone, 4),
            "roundtrip_plus_ngram_s": round(t_both, 4), "ratio": round(t_both / t_alone, 4),
            "ratio_within_run": round(within, 4), "ngram_s": round(med(together, "ngram_s"), 3),
            "ngram_lookup_s": round(lookup, 3), "ngram_update_s": round(update, 3),
            "roundtrip_tokens_per_s": round(args.tokens / t_alone), "bpb": together[-1]["bpb"],
            "all_seconds": {"roundtrip": [round(r["seconds"], 3) for r in alone],
                            "roundtrip_plus_ngram": [round(r["seconds"], 3) for r in together]}}


@toolkit.entry(tg.UserError)
def main(argv=None) -> int:
    p = cli_parser(__doc__)
    count = toolkit.positive_int
    p.add_argument("--tokens", type=count, default=131_072, help="validation targets (>= 100,000 for the figure)")
    p.add_argument("--val-shards", default="", help="DATA_PATH-style folder: use its val tokens instead of Zipf")
    p.add_argument("--layers", type=count, default=4)
    p.add_argument("--dim", type=count, default=128)
    p.add_argument("--heads", type=count, default=4)
    p.add_argument("--kv-heads", type=count, default=2)
    p.add_argument("--vocab", type=toolkit.int_in(2, 2**16), default=1024, help="2..65536 (uint16 token shards)")
    p.add_argument("--seq-len", type=toolkit.int_in(2), default=256)
    p.add_argument("--stride", type=count, default=64, help="1..--seq-len")
    p.add_argument("--batch-windows", type=count, default=32)
    p.add_argument("--chunk", type=count, default=8192, help="NGRAM_CHUNK_TOKENS")
    p.add_argument("--mixer", choices=("learned", "seed"), default="learned", help="NGRAM_MIXER (default learned)")
    p.add_argument("--repeats", type=count, default=3)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--seed", type=toolkit.non_negative_int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    args = p.parse_args(argv)
    toolkit.check_writable(args.json)
    res = run(args)
    text = " ".join(f"{k}:{v}" for k, v in res.items() if not isinstance(v, dict))
    emit(text, res, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
