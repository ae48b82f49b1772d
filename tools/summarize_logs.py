#!/usr/bin/env python3
"""One row per train_gpt.py log, plus mean and sample std over the logs.

    python3 tools/summarize_logs.py logs/*.txt                 # aligned text table
    python3 tools/summarize_logs.py logs/*.txt --markdown      # GitHub Markdown table
    python3 tools/summarize_logs.py logs/*.txt --json out.json # also write JSON ('-': JSON on stdout, table on stderr)

Logs of failed or unfinished runs (a `run_failed` line, a non-finite score, or a missing final line) and files that
are not train_gpt.py logs are skipped with a warning naming the file. `--allow-incomplete` keeps unfinished logs
(their missing or non-finite scores are left blank and excluded from mean/std). Exit status (tools/toolkit.py): 0 on
success; 2 with one `error:` line when no usable log is left, a file is given twice, the JSON cannot be written or
an argument is wrong.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402

# (key, header, format, getter). Keys are the JSON field names.
COLUMNS = [
    ("run", "run", "{}", lambda r: r.run_id),
    ("seed", "seed", "{}", lambda r: r.seed),
    ("steps", "steps", "{}", lambda r: r.steps),
    ("step_avg_ms", "ms/step", "{:.2f}", lambda r: r.step_avg_ms),
    ("train_time_s", "train s", "{:.1f}", lambda r: None if r.train_time_ms is None else r.train_time_ms / 1000),
    ("tokens_per_s", "tok/s", "{:,.0f}", lambda r: r.tokens_per_s),
    ("tokens_per_s_per_device", "tok/s/dev", "{:,.0f}", lambda r: r.tokens_per_s_per_device),
    ("ema_bpb", "EMA bpb", "{:.4f}", lambda r: r.diag_bpb("ema")),
    ("swa_bpb", "SWA bpb", "{:.4f}", lambda r: r.diag_bpb("swa")),
    ("raw_bpb", "raw bpb", "{:.4f}", lambda r: r.diag_bpb("raw")),
    ("roundtrip_val_loss", "rt loss", "{:.6f}", lambda r: r.roundtrip_exact.get("val_loss")),
    ("roundtrip_bpb", "rt bpb", "{:.6f}", lambda r: r.roundtrip_exact.get("val_bpb")),
    ("ngram_val_loss", "ngram loss", "{:.6f}", lambda r: r.ngram_exact.get("val_loss")),
    ("ngram_bpb", "ngram bpb", "{:.6f}", lambda r: r.ngram_exact.get("val_bpb")),
    ("ngram_hashed_bpb", "hashed bpb*", "{:.6f}", lambda r: r.event("ngram_hashed_unnormalized_exact").get("val_bpb")),
    ("ttt_bpb", "TTT bpb", "{:.6f}", lambda r: r.event("legal_ttt_exact").get("val_bpb")),
    ("total_bytes", "artifact B", "{:,}", lambda r: r.total_bytes),
    ("peak_memory_mib", "peak MiB", "{:,}", lambda r: r.peak_memory_mib),
    ("post_training_s", "post s", "{:.1f}", lambda r: None if r.post_training_ms is None else r.post_training_ms / 1000),
]
TEXT_KEYS = ("run", "seed")  # no mean/std for these


def summarize(runs) -> dict:
    """{'rows': [...], 'mean': {...}, 'std': {...}, 'n': N}; numeric columns only in mean/std."""
    rows = [dict({"file": str(r.path)}, **{key: _finite(get(r)) for key, _, _, get in COLUMNS}) for r in runs]
    mean, std = {}, {}
    for key, _, _, _ in COLUMNS:
        if key in TEXT_KEYS:
            continue
        mean[key], std[key] = logparse.mean_std(row[key] for row in rows)
    return {"n": len(rows), "rows": rows, "mean": mean, "std": std}


def _finite(value):
    """A cell value; a non-finite number (a diverged run kept by --allow-incomplete) is blank, never averaged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def used_columns(summary: dict) -> list[tuple]:
    """Columns with at least one value (optional diagnostics vanish when no log has them)."""
    return [c for c in COLUMNS if any(row[c[0]] is not None for row in summary["rows"])]


def fmt(value, spec: str) -> str:
    """Format a cell; blanks for missing values."""
    if value is None:
        return ""
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_cells(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body cells, including 'mean' and 'std' rows when there are 2+ logs."""
    cols = used_columns(summary)
    header = [h for _, h, _, _ in cols]
    body = [[fmt(row[k], spec) for k, _, spec, _ in cols] for row in summary["rows"]]
    if summary["n"] >= 2:
        for label in ("mean", "std"):
            stats = summary[label]
            body.append([label if k == "run" else fmt(stats.get(k), _stat_spec(spec)) for k, _, spec, _ in cols])
    return header, body


def _stat_spec(spec: str) -> str:
    """Counts keep one more decimal in the mean and std rows (e.g. steps 6771.7)."""
    return "{:,.1f}" if spec in ("{}", "{:,}") else spec


def render_markdown(summary: dict) -> str:
    """GitHub Markdown table with mean/std rows and footnotes."""
    header, body = table_cells(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + _footnote(summary)


def render_text(summary: dict) -> str:
    """Aligned plain-text table with mean/std rows and footnotes."""
    header, body = table_cells(summary)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
           for cells in [header] + body]
    return "\n".join(out) + _footnote(summary)


def _footnote(summary: dict) -> str:
    """Notes printed under the table."""
    notes = ["", f"{summary['n']} log(s); std is the sample standard deviation (ddof=1); rt = int6+zstd round trip."]
    if any(row["ngram_hashed_bpb"] is not None for row in summary["rows"]):
        notes.append("* hashed = ngram_hashed_unnormalized_exact: comparison mode, not a valid score.")
    return "\n".join(notes)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (every flag has help)."""
    p = logparse.cli_parser(__doc__)
    p.add_argument("logs", nargs="+", metavar="LOG", help="train_gpt.py log files (logs/<run_id>.txt)")
    p.add_argument("--json", metavar="OUT", help="write the summary as JSON to OUT ('-' for stdout instead of the table)")
    p.add_argument("--markdown", action="store_true", help="print a GitHub Markdown table instead of aligned text")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept truncated logs (runs still in progress); missing scores stay blank")
    return p


def usable_runs(paths, allow_incomplete: bool) -> list:
    """Parsed logs, skipping (with a warning) foreign files and, unless allowed, failed or unfinished runs."""
    runs = []
    for path in paths:
        try:
            run = logparse.parse_log(path)
            runs.append(run if allow_incomplete else logparse.require_complete(run))
        except logparse.LogError as exc:
            print(f"warning: skipped {exc}", file=sys.stderr)
    return runs


@toolkit.entry()
def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    toolkit.refuse_overwrite(args.json, toolkit.distinct_files(args.logs), "--json")
    runs = usable_runs(args.logs, args.allow_incomplete)
    if not runs:
        raise toolkit.ToolError(f"none of the {len(args.logs)} log(s) is a finished run (see the warnings)")
    summary = summarize(runs)
    logparse.emit(render_markdown(summary) if args.markdown else render_text(summary), summary, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
