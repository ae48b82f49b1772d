"""Benchmark the n-gram cache the way ngram_eval uses it: for each chunk, look up this rank's share of the chunk's
targets in batches (p_ngram of the target, as the scorer does), then update the tables with the whole chunk.

  python3 tools/bench_ngram_cache.py --tokens 2000000 --device cpu
  python3 tools/bench_ngram_cache.py --tokens 16000000 --device cpu --json -   # growth: first vs last chunks
  python3 tools/bench_ngram_cache.py --device cuda --json out.json             # full 62,021,632-token validation size

Prints tokens/s for lookup, update and both, the mean update time per chunk over the first and the last
--edge-chunks updated chunks (flat = the tables grow without a per-chunk cost proportional to their size), and peak
memory (torch.cuda.max_memory_allocated on GPU, ru_maxrss on CPU). --world W looks up 1/W of every chunk (one rank
of a W-GPU run; every rank updates the whole chunk). --json PATH writes the figures as one JSON object ('-' = stdout).
An argument out of range or inconsistent (--min-order > --max-order, --buckets not a power of two) or --device cuda
without a GPU is one `error:` line, exit 2 (tools/toolkit.py).
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

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


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def table_entries(cache) -> dict:
    if isinstance(cache, tg.ExactNgramCache):
        return {"contexts": [c.size for c in cache.ctx], "pairs": [p.size for p in cache.pairs],
                "runs": [len(t.runs) for t in cache.ctx + cache.pairs]}
    return {"buckets": int(cache.ctx.size(1))}


def run(args) -> dict:
    device = toolkit.torch_device(args.device)
    tokens = make_stream(args.tokens, args.vocab, args.dist, args.seed, device)
    kw = dict(min_order=args.min_order, max_order=args.max_order, min_count=args.min_count, device=device)
    cache = (tg.HashedNgramCache(num_buckets=args.buckets, **kw) if args.mode == "hashed"
             else tg.ExactNgramCache(args.vocab, **kw))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lookup_s, update_times = 0.0, []
    chunks = range(1, args.tokens + 1, args.chunk)
    with torch.inference_mode():
        for k, c0 in enumerate(chunks):
            c1 = min(c0 + args.chunk, args.tokens + 1)
            share = tg.split_for_rank(torch.arange(c0, c1, device=device), 0, args.world)
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, share.numel(), args.batch_positions):
                pos = share[i:i + args.batch_positions]
                cache.probs(tokens, pos, tokens[pos])
            sync(device)
            t1 = time.perf_counter()
            if c1 <= args.tokens:  # the last chunk is never read back (as in ngram_eval)
                cache.update(tokens, c0, c1)
                sync(device)
                update_times.append(time.perf_counter() - t1)
            lookup_s += t1 - t0
            if args.log_every and (k + 1) % args.log_every == 0:
                print(f"chunk {k + 1}/{len(chunks)} lookup:{lookup_s:.1f}s update:{sum(update_times):.1f}s "
                      f"last_update:{1000 * update_times[-1]:.1f}ms", file=sys.stderr)
    update_s = sum(update_times)
    total = lookup_s + update_s
    edge = update_times[:args.edge_chunks], update_times[-args.edge_chunks:]
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "mode": args.mode, "dist": args.dist, "tokens": args.tokens, "vocab": args.vocab, "chunk": args.chunk,
            "orders": [args.min_order, args.max_order], "world": args.world, "chunks": len(chunks),
            "lookup_s": round(lookup_s, 3), "update_s": round(update_s, 3), "total_s": round(total, 3),
            "tokens_per_s": round(args.tokens / max(total, 1e-9)),
            "update_tokens_per_s": round(args.tokens / max(update_s, 1e-9)),
            "lookup_tokens_per_s": round(args.tokens / args.world / max(lookup_s, 1e-9)),
            "update_ms_per_chunk_first": round(1000 * sum(edge[0]) / max(len(edge[0]), 1), 2),
            "update_ms_per_chunk_last": round(1000 * sum(edge[1]) / max(len(edge[1]), 1), 2),
            "peak_memory_bytes": peak_memory_bytes(device), "tables": table_entries(cache)}


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
    text = " ".join(f"{k}:{v}" for k, v in res.items() if k != "tables") + f"\ntables {json.dumps(res['tables'])}"
    logparse.emit(text, res, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
