#!/usr/bin/env python3
"""Is our mean score better than a baseline by at least a margin? One-sided one-sample Student t-test.

    python3 tools/significance.py --baseline 1.9200 --logs logs/seed*.txt
    python3 tools/significance.py --baseline 0.4800 --metric ngram --logs logs/seed*.txt   # exit 4 unless PASS

H0: mean >= baseline - min_improvement;  H1: mean < baseline - min_improvement.
t = (mean - (baseline - min_improvement)) / (s / sqrt(n)),  df = n - 1,  p = P(T_df <= t).
PASS when p < alpha. The t CDF is computed here (regularized incomplete beta by continued fraction), so no
scipy is needed.

Metrics: val_loss (final_int6_zstd_roundtrip_exact val_loss, nats; the default), ngram (ngram_eval_exact val_loss),
val_bpb / ngram_bpb (the same lines' val_bpb; the margin is then in bits per byte).

Exit status (tools/toolkit.py): 0 on PASS; 4 on FAIL (the figures are printed either way); 2 with one `error:` line
for unusable input: a truncated, failed or foreign log, a missing metric line, fewer than 2 logs, a file given twice,
two logs of one seed, identical scores (std 0: no t-test), a baseline or margin that is not a finite positive
number, an alpha outside (0, 1).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402

METRICS = {  # name -> (event, field, unit)
    "val_loss": ("final_int6_zstd_roundtrip_exact", "val_loss", "nats"),
    "val_bpb": ("final_int6_zstd_roundtrip_exact", "val_bpb", "bits/byte"),
    "ngram": ("ngram_eval_exact", "val_loss", "nats"),
    "ngram_bpb": ("ngram_eval_exact", "val_bpb", "bits/byte"),
}
RECORD_MIN_SEEDS = 3


# ------------------------------------------------------------------ Student t distribution (no scipy)

def _betacf(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df} must be > 0")
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t < 0 else 1.0 - tail


# ------------------------------------------------------------------ the test

def one_sided_ttest(values, baseline: float, min_improvement: float) -> dict:
    """One-sample one-sided t-test of mean(values) < baseline - min_improvement; returns every figure."""
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 values for a t-test, got {n}")
    mean, std = logparse.mean_std(values)
    threshold = baseline - min_improvement
    se = std / math.sqrt(n)
    if se == 0.0:  # identical scores: the test degenerates to a comparison
        t = -math.inf if mean < threshold else (math.inf if mean > threshold else 0.0)
        p = 0.0 if mean < threshold else (1.0 if mean > threshold else 0.5)
    else:
        t = (mean - threshold) / se
        p = t_cdf(t, n - 1)
    return {"n": n, "mean": mean, "std": std, "threshold": threshold, "t": t, "df": n - 1, "p": p}


def metric_values(runs, metric: str) -> list[float]:
    """The chosen metric from each run; LogError when a log lacks its line or its value is not finite."""
    event, key, _ = METRICS[metric]
    values = []
    for run in runs:
        found = run.event(event)
        if not found:
            raise logparse.LogError(f"{run.path}: no '{event}' line (needed for --metric {metric})")
        if not math.isfinite(float(found[key])):
            raise logparse.LogError(f"{run.path}: non-finite {key} ({found['line']}): a failed run has no score")
        values.append(float(found[key]))
    return values


def one_run_per_seed(runs) -> None:
    """The logs are independent runs: one per seed (a copied or repeated log would shrink the variance)."""
    seeds = [r.seed for r in runs]
    dupes = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
    if dupes:
        raise logparse.LogError(f"several logs for seed(s) {dupes}: the test needs one log per seed")


def check_args(args) -> None:
    """Ranges the parser cannot see: the margin stays below the baseline (a score is > 0)."""
    if args.min_improvement >= args.baseline:
        raise toolkit.ToolError(f"--min-improvement {args.min_improvement} must be below --baseline {args.baseline} "
                                "(the threshold baseline - min_improvement must stay > 0)")


def report(result: dict, args, values) -> str:
    """Human-readable result block; ends with the verdict line."""
    unit = METRICS[args.metric][2]
    verdict = "PASS" if result["p"] < args.alpha else "FAIL"
    lines = [
        f"test: one-sided one-sample Student t-test, H1: mean({args.metric}) < baseline - min_improvement",
        f"metric: {args.metric} ({unit}) from {METRICS[args.metric][0]}",
        f"values: {', '.join(f'{v:.8f}' for v in values)}",
        f"baseline: {args.baseline:.8f}  min_improvement: {args.min_improvement}  threshold: {result['threshold']:.8f}",
        f"n: {result['n']}  mean: {result['mean']:.8f}  std: {result['std']:.8f}  "
        f"improvement: {args.baseline - result['mean']:+.8f}",
        f"t: {result['t']:.4f}  df: {result['df']}  p-value: {result['p']:.6g}  alpha: {args.alpha}",
        f"verdict: {verdict} (p {'<' if verdict == 'PASS' else '>='} alpha)",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (every flag has help)."""
    p = logparse.cli_parser(__doc__)
    p.add_argument("--baseline", type=toolkit.positive_float, required=True,
                   help="score of the record to beat, in the metric's unit")
    p.add_argument("--logs", nargs="+", required=True, metavar="LOG", help="our train_gpt.py logs, one per seed (>= 2)")
    p.add_argument("--metric", choices=sorted(METRICS), default="val_loss",
                   help="which final score to test (default: val_loss = int6 round-trip exact val_loss)")
    p.add_argument("--min-improvement", type=toolkit.non_negative_float, default=0.005,
                   help="required margin below the baseline (default 0.005, nats for loss metrics)")
    p.add_argument("--alpha", type=toolkit.probability, default=0.01,
                   help="significance level in (0, 1) (default 0.01)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-': JSON on stdout, "
                                                   "text on stderr)")
    return p


@toolkit.entry()
def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    check_args(args)
    toolkit.refuse_overwrite(args.json, toolkit.distinct_files(args.logs), "--json")
    runs = logparse.load_runs(args.logs)
    values = metric_values(runs, args.metric)
    if len(values) < 2:
        raise toolkit.ToolError(f"need at least 2 logs for a t-test, got {len(values)}")
    one_run_per_seed(runs)
    if len(set(values)) == 1:
        raise toolkit.ToolError(f"all {len(values)} scores are {values[0]}: with no spread there is no t-test "
                                "(are these logs of one run?)")
    if len(values) < RECORD_MIN_SEEDS:
        print(f"warning: records need >= {RECORD_MIN_SEEDS} seeds; this test uses {len(values)}", file=sys.stderr)
    result = one_sided_ttest(values, args.baseline, args.min_improvement)
    passed = result["p"] < args.alpha
    figures = dict(result, metric=args.metric, values=values, baseline=args.baseline, alpha=args.alpha,
                   verdict="PASS" if passed else "FAIL")
    logparse.emit(report(result, args, values), figures, args.json)
    return toolkit.EXIT_OK if passed else toolkit.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
