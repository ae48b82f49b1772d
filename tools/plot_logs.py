#!/usr/bin/env python3
"""Training curves of one or more train_gpt.py logs on one 2x2 figure.

    python3 tools/plot_logs.py logs/*.txt -o curves.png

Panels: train loss vs step, train loss vs training wall-clock, val_bpb vs step, val_bpb vs wall-clock.
Each run is labelled at the end of its line (seed, or run id when seeds repeat), so no legend is needed; the final
int6 round-trip bpb is drawn as a hollow marker at the last step in the val_bpb panels. Truncated logs (runs still
in progress) are plotted too. The format follows the output's extension (.png, .pdf, .svg, ...); the file is
written whole or not at all. A foreign file, a file given twice, an unknown extension or an output that cannot be
written is one `error:` line, exit 2 (tools/toolkit.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402

PANELS = [  # (row, col, series kind, x key, y key, title)
    (0, 0, "train_step", "step", "train_loss", "train loss vs step"),
    (0, 1, "train_step", "time_s", "train_loss", "train loss vs wall-clock"),
    (1, 0, "val_step", "step", "val_bpb", "val_bpb vs step"),
    (1, 1, "val_step", "time_s", "val_bpb", "val_bpb vs wall-clock"),
]
XLABELS = {"step": "step", "time_s": "training time (s)"}
YLABELS = {"train_loss": "train loss (nats)", "val_bpb": "val bpb"}


def series(run, kind: str, xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    """x and y values of one run's step lines of one kind ('train_step' or 'val_step')."""
    xs, ys = [], []
    for e in run.step_events(kind):
        xs.append(e["train_time_ms"] / 1000.0 if xkey == "time_s" else e["step"])
        ys.append(e[ykey])
    return xs, ys


def run_labels(runs) -> list[str]:
    """'seed 1337' per run; run ids when seeds are missing or repeated."""
    seeds = [r.seed for r in runs]
    if None not in seeds and len(set(seeds)) == len(seeds):
        return [f"seed {s}" for s in seeds]
    return [r.run_id[:16] for r in runs]


def spread_labels(ys: list[float], min_gap: float, lo: float, hi: float) -> list[float]:
    """Label heights near ys, in the same order, at least min_gap apart and inside [lo, hi] when they fit."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = [min(max(y, lo), hi) for y in ys]
    for prev, cur in zip(order, order[1:]):
        out[cur] = max(out[cur], out[prev] + min_gap)
    top = out[order[-1]] if order else hi
    if top > hi:  # the stack ran over the top: push it down, but not below lo
        shift = min(top - hi, max(out[order[0]] - lo, 0.0))
        out = [y - shift for y in out]
    return out


def robust_ylim(all_ys: list[list[float]], all_xs: list[list[float]]) -> tuple[float, float] | None:
    """Y limits that ignore the first tenth of the x range (step-1 losses would flatten the curve)."""
    xmax = max((max(xs) for xs in all_xs if xs), default=0.0)
    late = [y for xs, ys in zip(all_xs, all_ys) for x, y in zip(xs, ys) if x >= 0.1 * xmax]
    if len(late) < 2:
        return None
    lo, hi = min(late), max(late)
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def draw_panel(ax, runs, labels, colors, panel) -> None:
    """One panel: a line per run, a label at its end, round-trip markers on val panels."""
    _, _, kind, xkey, ykey, title = panel
    data = [series(r, kind, xkey, ykey) for r in runs]
    ends = []
    for (xs, ys), label, color in zip(data, labels, colors):
        if not xs:
            continue
        ax.plot(xs, ys, color=color, lw=1.4, marker="o" if len(xs) < 30 else None, ms=3)
        ends.append((xs[-1], ys[-1], label, color))
    if kind == "val_step":
        _draw_roundtrip(ax, runs, colors, xkey)
    ylim = robust_ylim([d[1] for d in data], [d[0] for d in data])
    if ylim:
        ax.set_ylim(*ylim)
    _label_ends(ax, ends)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(XLABELS[xkey])
    ax.set_ylabel(YLABELS[ykey])
    ax.grid(alpha=0.3)


def _draw_roundtrip(ax, runs, colors, xkey) -> None:
    """Hollow marker at (last step, final round-trip bpb) for finished runs."""
    for run, color in zip(runs, colors):
        rt = run.roundtrip_exact.get("val_bpb")
        x = run.steps if xkey == "step" else (run.train_time_ms or 0) / 1000.0
        if rt is not None and x is not None:
            ax.plot([x], [rt], marker="D", mfc="none", color=color, ms=6)


def _label_ends(ax, ends) -> None:
    """Write each run's label just right of its last point, de-overlapped vertically."""
    if not ends:
        return
    lo, hi = ax.get_ylim()
    ys = spread_labels([y for _, y, _, _ in ends], 0.06 * (hi - lo), lo + 0.02 * (hi - lo), hi - 0.02 * (hi - lo))
    xmax = max(x for x, _, _, _ in ends)
    left, right = ax.get_xlim()
    ax.set_xlim(left, right + 0.18 * (right - left))  # room for the labels
    for (x, y, label, color), ly in zip(ends, ys):
        ax.annotate(f"{label}  {y:.4f}", xy=(x, min(max(y, lo), hi)), xytext=(xmax + 0.02 * (right - left), ly),
                    textcoords="data", color=color, fontsize=8, va="center",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6))


def plot(runs, out: Path, title: str | None = None) -> Path:
    """Draw the 2x2 figure for the runs and save it to out (PNG, or whatever the suffix says)."""
    labels = run_labels(runs)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for panel in PANELS:
        draw_panel(axes[panel[0]][panel[1]], runs, labels, colors, panel)
    fig.suptitle(title or default_title(runs), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format=out.suffix[1:].lower())
        os.replace(tmp, out)
    except OSError as e:
        raise toolkit.ToolError(f"-o {out}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def check_output(out: Path) -> None:
    """The extension names a format matplotlib writes (without one, savefig would append .png to another name)."""
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise toolkit.ToolError(f"-o {out}: unknown image format {out.suffix or '(no extension)'}; use one of "
                                + ", ".join("." + f for f in sorted(formats)))


def default_title(runs) -> str:
    """'train_gpt.py: 3 runs (seeds 1337, 42, 2024); ◇ = int6 round-trip bpb'."""
    seeds = ", ".join(str(r.seed) for r in runs)
    return f"train_gpt.py: {len(runs)} run{'s' if len(runs) != 1 else ''} (seeds {seeds}); ◇ = final int6 round-trip bpb"


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (every flag has help)."""
    p = logparse.cli_parser(__doc__)
    p.add_argument("logs", nargs="+", metavar="LOG", help="train_gpt.py log files")
    p.add_argument("-o", "--output", default="curves.png", help="output image path (default curves.png)")
    p.add_argument("--title", help="figure title (default: run count and seeds)")
    return p


@toolkit.entry()
def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    check_output(Path(args.output))
    toolkit.refuse_overwrite(args.output, toolkit.distinct_files(args.logs), "-o")
    runs = logparse.load_runs(args.logs, complete=False)
    print(plot(runs, Path(args.output), args.title))
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
