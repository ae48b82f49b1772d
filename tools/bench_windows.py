"""Benchmark window planning: the host work every rank does at the start of every evaluation pass, as evaluate()
does it before its first forward: plan the sliding windows of the whole split (plan_windows), cut them at the
n-gram chunks (group_by_chunk), take this rank's share of every chunk (split_for_rank) and lay the shares out as one
window table, each share padded to whole batches (evaluate's layout: one numpy fill, device cpu: no copy).

  python3 tools/bench_windows.py              # the record's pass: 62,021,632 targets, seq 2048, stride 64,
                                              # chunks of 65,536, world 8, 32 windows per batch
  python3 tools/bench_windows.py --json -     # figures as JSON on stdout

Prints the median seconds of --repeats runs for each step and in all (target: <= 0.5 s on one CPU core; windows
are one int64 [n, 3] array end to end), and the numbers of windows, window pieces, chunks and table rows.
"""
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
import logparse  # noqa: E402
import toolkit  # noqa: E402


def plan_once(args) -> tuple[dict, dict]:
    """(seconds per step, sizes) of one planning of the pass."""
    t0 = time.perf_counter()
    windows = tg.plan_windows(args.targets, args.seq_len, args.stride)
    t1 = time.perf_counter()
    chunks = tg.group_by_chunk(windows, args.chunk)
    t2 = time.perf_counter()
    table = tg.window_table([tg.split_for_rank(c, args.rank, args.world) for _, _, c in chunks], args.batch_windows,
                            "cpu")[0].host
    t3 = time.perf_counter()
    sizes = {"windows": len(windows), "pieces": sum(len(c) for _, _, c in chunks), "chunks": len(chunks),
             "table_rows": len(table)}
    return {"plan_s": t1 - t0, "group_s": t2 - t1, "split_table_s": t3 - t2, "total_s": t3 - t0}, sizes


def run(args) -> dict:
    runs = [plan_once(args) for _ in range(args.repeats)]
    times = {k: round(statistics.median(r[0][k] for r in runs), 4) for k in runs[0][0]}
    return {"targets": args.targets, "seq_len": args.seq_len, "stride": args.stride, "chunk": args.chunk,
            "world": args.world, "rank": args.rank, "batch_windows": args.batch_windows, "repeats": args.repeats,
            **runs[0][1], **times, "target_s": 0.5, "ok": times["total_s"] <= 0.5}


@toolkit.entry()
def main(argv=None) -> int:
    p = toolkit.cli_parser(__doc__)
    count = toolkit.positive_int
    p.add_argument("--targets", type=count, default=62_021_632, help="validation targets (default: the full split)")
    p.add_argument("--seq-len", type=count, default=2048, help="EVAL_SEQ_LEN")
    p.add_argument("--stride", type=count, default=64, help="EVAL_STRIDE, <= --seq-len")
    p.add_argument("--chunk", type=count, default=65_536, help="NGRAM_CHUNK_TOKENS")
    p.add_argument("--world", type=count, default=8)
    p.add_argument("--rank", type=toolkit.non_negative_int, default=0, help="< --world")
    p.add_argument("--batch-windows", type=count, default=32, help="EVAL_BATCH_WINDOWS")
    p.add_argument("--repeats", type=count, default=3)
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    args = p.parse_args(argv)
    if args.rank >= args.world or args.stride > args.seq_len:
        p.error(f"need --rank < --world and --stride <= --seq-len (got {args.rank}, {args.world}, {args.stride}, "
                f"{args.seq_len})")
    toolkit.check_writable(args.json)
    res = run(args)
    logparse.emit(" ".join(f"{k}:{v}" for k, v in res.items()), res, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
