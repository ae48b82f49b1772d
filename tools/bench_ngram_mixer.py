"""Benchmark the n-gram mixers on real text: the model alone, the seed rule and the learned mixer, for the first N
validation targets, from one pass of the script's own evaluator (the same logits feed all three scores).

  python3 tools/bench_ngram_mixer.py --bench ../shared/bench                 # build, train, evaluate (CPU, long)
  python3 tools/bench_ngram_mixer.py --artifact bench_data/bench400.int6.ptz --json -
  python3 tools/bench_ngram_mixer.py --data DIR --tokenizer T.model --artifact A --targets 262144 1000000

Data: --data/--tokenizer (default: the bench corpus's dataset under bench_data/). When it is missing and --bench
names the bench corpus folder (english_mix_v1.jsonl.xz + english_mix_sp1024.model), it is built first with
data/make_dataset.py: the corpus's own tokenizer, its last 4,000 documents as the val split. Nothing of the corpus
enters the repository: bench_data/ is git-ignored.
Model: --artifact, else one trained by train_gpt.py with run.sh's CPU demo shape for --steps steps (default 400,
n-gram eval off) into bench_data/, reused when it exists.
Evaluation: for each --targets N, the first N validation targets (cut to whole EVAL_SEQ_LEN sequences, as
VAL_MAX_TOKENS cuts them) in one evaluate() pass of the demo's eval shape (seq 256, stride 64) with chunks of
NGRAM_CHUNK_TOKENS (default 65,536): round trip, NGRAM_MIXER=seed and NGRAM_MIXER=learned (each with its own exact
cache and normalization audit). Reports bpb, the difference to the model, the share of targets by the highest order
each mixer used, what the learned mixer learned (its ngram_mixer fields), and whether learned <= model + 0.0005 bpb
(`never_worse`). Exit 4 when it is not, or when training fails; 2 on a user error (tools/toolkit.py). Settings
(NGRAM_*, EVAL_*) come from the environment.
"""
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402
from demo_config import CPU_DEMO_ENV  # noqa: E402
from logparse import cli_parser, emit  # noqa: E402
from toolkit import CheckFailed, ToolError  # noqa: E402

WORK = ROOT / "bench_data"
BENCH_CORPUS, BENCH_TOKENIZER = "english_mix_v1.jsonl.xz", "english_mix_sp1024.model"
BENCH_VAL_DOCS = 4000
NEVER_WORSE_BPB = 0.0005
EVAL_ENV = {k: CPU_DEMO_ENV[k] for k in ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "XSA_LAST_N",
                                          "BIGRAM_DIM", "EVAL_SEQ_LEN", "EVAL_STRIDE", "KEEP_FLOAT_MAX_NUMEL")}


def default_paths() -> tuple[Path, Path]:
    return WORK / "datasets" / "bench_sp1024", WORK / "tokenizers" / "bench_1024_bpe.model"


def ensure_dataset(data: Path, tokenizer: Path, bench: str | None) -> None:
    """The dataset exists, or is built from the bench corpus folder; otherwise a user error that says how."""
    if data.is_dir() and tokenizer.is_file():
        return
    if bench is None:
        raise ToolError(f"{data}: no dataset; pass --bench <folder of {BENCH_CORPUS}> to build it, or --data/--tokenizer")
    corpus, tok = Path(bench) / BENCH_CORPUS, Path(bench) / BENCH_TOKENIZER
    if not corpus.is_file() or not tok.is_file():
        raise ToolError(f"--bench {bench}: expected {BENCH_CORPUS} and {BENCH_TOKENIZER} in that folder")
    if data != default_paths()[0]:
        raise ToolError("--bench builds the dataset under bench_data/; leave --data/--tokenizer at their defaults")
    cmd = [sys.executable, str(ROOT / "data" / "make_dataset.py"), "--input", str(corpus), "--name", "bench",
           "--val-docs", str(BENCH_VAL_DOCS), "--val-from", "last", "--tokenizer", str(tok), "--out-dir", str(WORK)]
    print("bench_ngram_mixer: building the dataset: " + " ".join(cmd), file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise ToolError(f"building the dataset from {corpus} failed (see make_dataset's message above)")


def train_env(data: Path, tokenizer: Path, steps: int, artifact: Path) -> dict:
    """train_gpt.py's environment for the benchmark model: run.sh's CPU demo, --steps steps, no n-gram eval."""
    settings = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    keep = {k: v for k, v in os.environ.items() if k not in settings}
    return {**keep, **CPU_DEMO_ENV, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer),
            "ITERATIONS": str(steps), "VAL_LOSS_EVERY": "0", "NGRAM_ENABLED": "0", "VAL_MAX_TOKENS": "8192",
            "ARTIFACT_PATH": str(artifact), "LOG_DIR": str(artifact.parent / "logs"),
            "RUN_ID": f"{artifact.stem.split('.')[0]}_{int(time.time())}"}


def ensure_artifact(args, data: Path, tokenizer: Path) -> Path:
    if args.artifact:
        if not Path(args.artifact).is_file():
            raise ToolError(f"--artifact {args.artifact}: no such file")
        return Path(args.artifact)
    artifact = WORK / f"bench{args.steps}.int6.ptz"
    if not artifact.is_file():
        print(f"bench_ngram_mixer: training {artifact} ({args.steps} steps, CPU demo shape)", file=sys.stderr,
              flush=True)
        out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=ROOT,
                             env=train_env(data, tokenizer, args.steps, artifact))
        if out.returncode != 0:
            raise CheckFailed(f"training the benchmark model failed (train_gpt.py exit {out.returncode})")
    return artifact


def settings(data: Path, tokenizer: Path, art, targets: int) -> tg.Hyperparameters:
    """The environment's settings over the demo's eval shape (NGRAM_*, EVAL_* from the environment win); the
    model's shape is the artifact's."""
    env = {**EVAL_ENV, "NGRAM_CHUNK_TOKENS": "65536", **os.environ, "DATA_PATH": str(data),
           "TOKENIZER_PATH": str(tokenizer), "VAL_MAX_TOKENS": str(targets), "DEVICE": "cpu", "COMPILE": "0",
           "ARTIFACT_PATH": art.path, "NGRAM_LOG_EVERY": "0"}
    return tg.adopt_artifact_config(tg.Hyperparameters.from_env(env), art.config, {})


def model_nll(logp, batch):
    """The plain scorer: -log p_model(target) of the batch's scored entries."""
    return -logp.gather(1, batch.tgt[:, None]).squeeze(1)


def evaluate(h: tg.Hyperparameters, art) -> dict:
    """One pass: round trip, seed rule and learned mixer from the same logits; per-mixer usage and learned fields."""
    rt = tg.single_process_runtime()
    model = tg.build_model(h, rt)
    model.load_state_dict(art.state, strict=True)
    val = tg.load_val_data(h, tg.load_tokenizer(h))
    scorers = {kind: tg.make_ngram_scorer(val.tokens, dataclasses.replace(h, ngram_mixer=kind), rt)
               for kind in ("seed", "learned")}

    def after_chunk(start: int, end: int) -> None:
        for s in scorers.values():
            s.after_chunk(start, end)

    windows = tg.plan_windows(val.num_targets, h.eval_seq_len, h.eval_stride)
    t0 = time.perf_counter()
    res = tg.evaluate(model, val, windows, {"model": model_nll, **scorers}, h, rt, h.ngram_chunk_tokens, after_chunk)
    seconds = time.perf_counter() - t0
    out = {"targets": val.num_targets, "bytes": res["model"].bytes, "seconds": round(seconds, 1),
           "model_bpb": res["model"].bpb}
    for kind, s in scorers.items():
        s.audit_report(exact=True)
        used = (s.mixer.used / s.mixer.used.sum()).tolist()
        out[f"{kind}_bpb"] = res[kind].bpb
        out[f"{kind}_delta"] = res[kind].bpb - res["model"].bpb
        out[f"{kind}_used"] = {f"o{h.ngram_min_order + k}": round(x, 4) for k, x in enumerate(used[1:])}
    out["learned_fields"] = scorers["learned"].mixer.learned()
    out["never_worse"] = out["learned_bpb"] <= out["model_bpb"] + NEVER_WORSE_BPB
    return out


def table(rows: list[dict]) -> str:
    head = ("| targets | model (round trip) | seed rule | learned mixer | share of targets by highest order used "
            "(o2 .. o9), seed / learned |\n| ---: | ---: | ---: | ---: | --- |")
    lines = [head]
    for r in rows:
        used = " / ".join(" ".join(f"{v:.3f}" for v in r[f"{kind}_used"].values()) for kind in ("seed", "learned"))
        lines.append(f"| {r['targets']:,} | {r['model_bpb']:.4f} | {r['seed_bpb']:.4f} ({r['seed_delta']:+.4f}) | "
                     f"{r['learned_bpb']:.4f} ({r['learned_delta']:+.4f}) | {used} |")
    return "\n".join(lines)


@toolkit.entry(tg.UserError)
def main(argv=None) -> int:
    p = cli_parser(__doc__)
    p.add_argument("--bench", default=None, help="folder of the bench corpus: build the dataset when it is missing")
    p.add_argument("--data", default=None, help="DATA_PATH of the dataset (default: bench_data/datasets/bench_sp1024)")
    p.add_argument("--tokenizer", default=None, help="its tokenizer (default: bench_data/tokenizers/bench_1024_bpe.model)")
    p.add_argument("--artifact", default=None, help="score this artifact instead of training one")
    p.add_argument("--steps", type=toolkit.positive_int, default=400,
                   help="training steps of the benchmark model (default 400)")
    p.add_argument("--targets", type=toolkit.positive_int, nargs="+", default=[262_144, 1_000_000],
                   help="first N val targets, one pass each (default 262144 1000000)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    args = p.parse_args(argv)
    toolkit.check_writable(args.json)
    data_default, tok_default = default_paths()
    data, tokenizer = Path(args.data or data_default), Path(args.tokenizer or tok_default)
    ensure_dataset(data, tokenizer, args.bench)
    art = tg.load_artifact(str(ensure_artifact(args, data, tokenizer)))
    rows = [dict(evaluate(settings(data, tokenizer, art, n), art), requested=n) for n in args.targets]
    text = table(rows) + "".join(f"\nlearned mixer, {r['targets']:,} targets: {r['learned_fields']}" for r in rows)
    emit(text, {"artifact": art.path, "data": str(data), "rows": rows}, args.json)
    worse = [f"{r['targets']:,} targets: {r['learned_delta']:+.4f}" for r in rows if not r["never_worse"]]
    if worse:
        raise CheckFailed(f"the learned mixer is worse than the model by more than {NEVER_WORSE_BPB} bpb "
                          f"({', '.join(worse)})")
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
