"""Benchmark the n-gram cache the way ngram_eval uses it: for each chunk, read this rank's share of the chunk's
targets through the scorer (NgramScorer.lookup: the stats of the whole share in one call at the chunk's first
batch, the seed rule's order and p_ngram of the target gathered per batch), then update the tables with the whole
chunk (NgramScorer.after_chunk).

  python3 tools/bench_ngram_cache.py --tokens 2000000 --device cpu
  python3 tools/bench_ngram_cache.py --tokens 16000000 --device cpu --json -   # growth: first vs last chunks
  python3 tools/bench_ngram_cache.py --device cuda --json out.json             # full 62,021,632-token validation size

Prints tokens/s for lookup, update and both, the mean update time per chunk over the first and the last
--edge-chunks updated chunks (flat = the tables grow without a per-chunk cost proportional to their size), and peak
memory (torch.cuda.max_memory_allocated on GPU, ru_maxrss on CPU). --world W looks up 1/W of every chunk (one rank
of a W-GPU run; every rank updates the whole chunk). --json PATH writes the figures as one JSON object ('-' = stdout).

--count also counts what the GPU would be launched for (a Python hook on every op: its times are not speeds):
aten ops and host syncs per 1,000 looked-up targets and per chunk update, with a TorchDispatchMode. An op is one
dispatched aten call (views included). A host sync is an op that makes the host wait for the device: reading a value
(.item(), int()/float()/bool() of a tensor: aten item / _local_scalar_dense; .tolist(), .numpy(), .cpu()), an
output whose size depends on the data (nonzero, unique*, masked_select, bincount, boolean-mask indexing or
assignment, repeat_interleave without output_size), or a copy from the device to the host. lookup_checksum sums
the looked-up orders and probabilities, so two versions of the cache can be checked for the same answers.

An argument out of range or inconsistent (--min-order > --max-order, --buckets not a power of two) or --device cuda
without a GPU is one `error:` line, exit 2 (tools/toolkit.py).
"""
import argparse
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402


def make_stream(n: int, vocab: int, dist: str, seed: int, device) -> torch.Tensor:
    """n + 1 i.i.d. tokens: uniform, or Zipf-like (p ~ 1/(rank+1)^1.1, a worst case for unique long contexts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if dist == "uniform":
        return torch.randint(0, vocab, (n + 1,), generator=g, device=device)
    probs = 1.0 / torch.arange(1, vocab + 1, device=device, dtype=torch.float64) ** 1.1
    parts, left = [], n + 1
    while left > 0:  # multinomial draws at most 2^24 samples per call
        k = min(left, 1 << 24)
        parts.append(torch.multinomial(probs, k, replacement=True, generator=g))
        left -= k
    return torch.cat(parts)


SYNC_OPS = {"item", "_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "unique_dim_consecutive", "masked_select", "bincount"}
HOST_READS = ("tolist", "numpy", "cpu")  # Tensor methods that hand device data to the host


def forces_sync(func, args, kwargs) -> bool:
    """Does this aten call make the host wait for the device (the rule in the module docstring)?"""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in ("_to_copy", "to", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst = args[0].device if name == "copy_" else kwargs.get("device")
        return dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host syncs (by name) while active; Tensor.tolist/numpy/cpu count as syncs too."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.sync_names = 0, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if forces_sync(func, args, kwargs):
            self._sync(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    def _sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_names[name] += 1

    def __enter__(self):
        for name in HOST_READS:
            method = getattr(torch.Tensor, name)

            def read(t, *a, _method=method, _name=name, **kw):
                self._sync(_name)
                return _method(t, *a, **kw)
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name in HOST_READS:
            delattr(torch.Tensor, name)  # the class's own method shows through again
        return super().__exit__(*exc)

    def take(self) -> tuple[int, int]:
        """(ops, syncs) counted since the last take."""
        out = (self.ops, self.syncs)
        self.ops = self.syncs = 0
        return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device) -> int:
    """Allocated bytes on CUDA, the process's peak RSS on the CPU."""
    return int(next(iter(toolkit.peak_memory_mib(device).values())) * 2**20)


def table_entries(cache) -> dict:
    if isinstance(cache, tg.ExactNgramCache):
        return {"contexts": cache.ctx.size, "pairs": cache.pairs.size,
                "runs": [len(cache.ctx.runs), len(cache.pairs.runs)]}
    return {"buckets": int(cache.ctx.size(1))}


class Counts:
    """Per-phase op and sync counts of a --count run (no-ops without --count)."""

    def __init__(self, on: bool):
        self.counter = OpCounter() if on else None
        self.lookup, self.lookup_targets, self.updates = [0, 0], 0, []

    @contextlib.contextmanager
    def phase(self):
        if self.counter is None:
            yield
            return
        with self.counter:
            yield

    def add_lookup(self, targets: int) -> None:
        if self.counter is not None:
            ops, syncs = self.counter.take()
            self.lookup[0] += ops
            self.lookup[1] += syncs
            self.lookup_targets += targets

    def add_update(self) -> None:
        if self.counter is not None:
            self.updates.append(self.counter.take())

    def report(self) -> dict:
        if self.counter is None:
            return {}
        per_k = 1000 / max(self.lookup_targets, 1)
        ops, syncs = [u[0] for u in self.updates] or [0], [u[1] for u in self.updates] or [0]
        return {"lookup_ops_per_1k_targets": round(self.lookup[0] * per_k, 1),
                "lookup_syncs_per_1k_targets": round(self.lookup[1] * per_k, 2),
                "update_ops_per_chunk": round(sum(ops) / len(ops), 1), "update_ops_per_chunk_max": max(ops),
                "update_syncs_per_chunk": round(sum(syncs) / len(syncs), 1),
                "update_syncs_per_chunk_max": max(syncs),
                "sync_ops": dict(sorted(self.counter.sync_names.items()))}


def look_up_chunk(scorer, share: range, batch_positions: int, counts: Counts) -> list:
    """The scorer's n-gram reads for one chunk (this rank's share): order and p_ngram of every target, in batches."""
    out, span = [], (share.start, share.stop)
    for i in range(share.start, share.stop, batch_positions):
        pos = torch.arange(i, min(i + batch_positions, share.stop), device=scorer.tokens.device)
        with counts.phase():
            order, p = scorer.lookup(pos, span)
        counts.add_lookup(pos.numel())
        out.append(torch.stack([order.double(), p]).sum(1))
    return out


def run(args) -> dict:
    device = toolkit.torch_device(args.device)
    tokens = make_stream(args.tokens, args.vocab, args.dist, args.seed, device)
    h = tg.Hyperparameters(vocab_size=args.vocab, ngram_min_order=args.min_order, ngram_max_order=args.max_order,
                           ngram_min_count=args.min_count, ngram_mode=args.mode, ngram_buckets=args.buckets,
                           ngram_mixer="seed")
    scorer = tg.make_ngram_scorer(tokens, h, tg.single_process_runtime(device))  # the eval's own cache and scorer
    cache = scorer.cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lookup_s, update_times, counts, sums = 0.0, [], Counts(args.count), []
    chunks = range(1, args.tokens + 1, args.chunk)
    with torch.inference_mode():
        for k, c0 in enumerate(chunks):
            c1 = min(c0 + args.chunk, args.tokens + 1)
            share = tg.split_for_rank(range(c0, c1), 0, args.world)
            sync(device)
            t0 = time.perf_counter()
            sums += look_up_chunk(scorer, share, args.batch_positions, counts)
            sync(device)
            t1 = time.perf_counter()
            if c1 <= args.tokens:  # the last chunk is never read back (as in ngram_eval)
                with counts.phase():
                    scorer.after_chunk(c0, c1)
                counts.add_update()
                sync(device)
                update_times.append(time.perf_counter() - t1)
            lookup_s += t1 - t0
            if args.log_every and (k + 1) % args.log_every == 0:
                print(f"chunk {k + 1}/{len(chunks)} lookup:{lookup_s:.1f}s update:{sum(update_times):.1f}s "
                      f"last_update:{1000 * update_times[-1]:.1f}ms", file=sys.stderr)
    update_s = sum(update_times)
    total = lookup_s + update_s
    edge = update_times[:args.edge_chunks], update_times[-args.edge_chunks:]
    checksum = torch.stack(sums).sum(0).tolist() if sums else [0.0, 0.0]
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "mode": args.mode, "dist": args.dist, "tokens": args.tokens, "vocab": args.vocab, "chunk": args.chunk,
            "orders": [args.min_order, args.max_order], "world": args.world, "chunks": len(chunks),
            "lookup_s": round(lookup_s, 3), "update_s": round(update_s, 3), "total_s": round(total, 3),
            "tokens_per_s": round(args.tokens / max(total, 1e-9)),
            "update_tokens_per_s": round(args.tokens / max(update_s, 1e-9)),
            "lookup_tokens_per_s": round(args.tokens / args.world / max(lookup_s, 1e-9)),
            "update_ms_per_chunk_first": round(1000 * sum(edge[0]) / max(len(edge[0]), 1), 2),
            "update_ms_per_chunk_last": round(1000 * sum(edge[1]) / max(len(edge[1]), 1), 2),
            "peak_memory_bytes": peak_memory_bytes(device),
            "lookup_checksum": [round(checksum[0]), f"{checksum[1]:.12e}"], **counts.report(),
            "tables": table_entries(cache)}


def parse_args(argv=None) -> argparse.Namespace:
    p = toolkit.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = toolkit.positive_int
    p.add_argument("--tokens", type=count, default=62_021_632, help="number of targets (default: the val set)")
    p.add_argument("--vocab", type=toolkit.int_in(2, 2**16), default=1024, help="2..65536 (uint16 token shards)")
    p.add_argument("--dist", choices=("zipf", "uniform"), default="zipf")
    p.add_argument("--mode", choices=("exact", "hashed"), default="exact")
    p.add_argument("--buckets", type=count, default=4_194_304, help="hashed mode only; a power of two")
    p.add_argument("--chunk", type=count, default=65_536)
    p.add_argument("--min-order", type=toolkit.int_in(2), default=2, help=">= 2 (a context of at least one token)")
    p.add_argument("--max-order", type=toolkit.int_in(2), default=9, help=">= --min-order")
    p.add_argument("--min-count", type=count, default=2)
    p.add_argument("--batch-positions", type=count, default=2048, help="scored targets per batch (32 windows x 64)")
    p.add_argument("--world", type=count, default=1, help="look up 1/world of each chunk (one rank's share)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=toolkit.non_negative_int, default=0)
    p.add_argument("--log-every", type=toolkit.non_negative_int, default=100,
                   help="progress to stderr every N chunks (0: off)")
    p.add_argument("--edge-chunks", type=count, default=8, help="updated chunks averaged at the start and the end")
    p.add_argument("--count", action="store_true", help="count aten ops and host syncs (slow: times are not speeds)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-': JSON on stdout, "
                                                   "text on stderr)")
    args = p.parse_args(argv)
    if args.min_order > args.max_order:
        p.error(f"--min-order {args.min_order} must be <= --max-order {args.max_order}")
    if args.buckets & (args.buckets - 1):
        p.error(f"--buckets {args.buckets} must be a power of two (the hashed tables mask with buckets - 1)")
    toolkit.check_writable(args.json)
    return args


@toolkit.entry(tg.UserError)
def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    text = " ".join(f"{k}:{v}" for k, v in res.items() if k not in ("tables", "sync_ops"))
    text += f"\ntables {json.dumps(res['tables'])}" + (f"\nsync_ops {json.dumps(res['sync_ops'])}" if args.count else "")
    logparse.emit(text, res, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
