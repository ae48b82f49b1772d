"""Compare the two export quantizers (EXPORT_QUANTIZER=gptq_lite|gptq) on the same trained weights: round-trip gap,
bytes and time.

  python3 tools/bench_gptq.py                                   # CPU demo model, sample corpus, 80 steps
  ITERATIONS=40 GPTQ_CALIB_SEQS=8 python3 tools/bench_gptq.py --json -

The tool trains the CPU demo model in-process (run.sh's CPU settings, step-based: ITERATIONS steps, no wall-clock
cap, no periodic validation, KEEP_FLOAT_MAX_NUMEL=4096 so that its small matrices are int6 as in the record model;
every setting can be overridden through the environment exactly as for train_gpt.py),
takes the export weights (EXPORT_WEIGHTS), scores them unquantized with the sliding-window evaluation (fp_bpb), then
exports them once per quantizer, rebuilds the model from each artifact's bytes and scores it the same way.
gap = round-trip val_bpb − fp_bpb of the same weights. export_s is the whole export: for gptq the calibration
(GPTQ_CALIB_SEQS × GPTQ_CALIB_LEN self-generated tokens, no data read) plus quantization, for both the int6 + zstd
packing. The n-gram cache is not involved. A setting or path problem prints one `error: ...` line and exits 2
(tools/toolkit.py).
"""
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_config  # noqa: E402
import logparse  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402

CPU_DEMO = dict(demo_config.CPU_DEMO_ENV, ITERATIONS="80", WARMUP_STEPS="0", WARMDOWN_ITERS="30", VAL_LOSS_EVERY="0",
                TRAIN_LOG_EVERY="20", GPTQ_CALIB_SEQS="16", GPTQ_CALIB_LEN="256")  # run.sh's demo, shorter


def demo_hparams(env) -> tg.Hyperparameters:
    h = tg.Hyperparameters.from_env({**CPU_DEMO, **env})
    h.validate(1)
    return h


def train_weights(h: tg.Hyperparameters, rt: tg.Runtime, val: tg.ValData) -> tuple[tg.GPT, dict, float]:
    """(model, export weights, training seconds) after ITERATIONS steps: the weights EXPORT_WEIGHTS names, in the
    model's dtypes (the averages are kept in fp32), as the script exports them."""
    torch.manual_seed(h.seed)
    model = tg.build_model(h, rt)
    t0 = time.perf_counter()
    result = tg.train(model, model, tg.build_optimizers(model, h, rt), val, h, rt)
    chosen = result.raw if h.export_weights == "raw" else getattr(result, h.export_weights).state()
    return model, {k: v.to(result.raw[k].dtype) for k, v in chosen.items()}, time.perf_counter() - t0


def roundtrip(state: dict, h: tg.Hyperparameters, rt: tg.Runtime, val: tg.ValData, model: tg.GPT) -> dict:
    """Export `state` with h.export_quantizer, rebuild from the bytes, score; model is used for calibration."""
    t0 = time.perf_counter()
    quantizer = tg.calibrate_gptq(model, state, h, rt) if h.export_quantizer == "gptq" else None
    blob, stats = tg.pack_artifact(state, h, quantizer)
    export_s = time.perf_counter() - t0
    rebuilt = tg.build_model(h, rt)
    rebuilt.load_state_dict(tg.unpack_artifact(blob)[1], strict=True)
    res = {"bpb": tg.sliding_eval(rebuilt, val, h, rt).bpb, "payload_bytes": stats.payload_bytes,
           "model_bytes": len(blob), "export_s": round(export_s, 2)}
    if quantizer is not None:
        res.update(calib_ms=round(quantizer.calib_ms), quant_ms=round(quantizer.quant_ms),
                   matrices=quantizer.matrices, rows=quantizer.rows, fallback_rows=quantizer.fallback_rows)
    return res


def run(env) -> dict:
    h = demo_hparams(env)
    rt = tg.init_runtime(h)
    val = tg.load_val_data(h, tg.load_tokenizer(h))
    model, state, train_s = train_weights(h, rt, val)
    model.load_state_dict(state, strict=True)
    fp_bpb = tg.sliding_eval(model, val, h, rt).bpb
    out = {"iterations": h.iterations, "export_weights": h.export_weights, "train_s": round(train_s, 1),
           "calib_seqs": h.gptq_calib_seqs, "calib_len": h.gptq_calib_len, "fp_bpb": round(fp_bpb, 5)}
    for name in ("gptq_lite", "gptq"):
        res = roundtrip(state, dataclasses.replace(h, export_quantizer=name), rt, val, model)
        res["gap"] = round(res["bpb"] - fp_bpb, 5)
        res["bpb"] = round(res["bpb"], 5)
        out[name] = res
    return out


def report(res: dict) -> str:
    lines = [f"bench_gptq iterations:{res['iterations']} fp_bpb:{res['fp_bpb']} train_s:{res['train_s']}"]
    for name in ("gptq_lite", "gptq"):
        lines.append(f"bench_gptq quantizer:{name} " + " ".join(f"{k}:{v}" for k, v in res[name].items()))
    return "\n".join(lines)


@toolkit.entry(tg.UserError)
def main(argv=None) -> int:
    p = logparse.cli_parser(__doc__)
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    args = p.parse_args(argv)
    toolkit.check_writable(args.json)
    with contextlib.redirect_stdout(sys.stderr):  # train_gpt's log lines; stdout may carry the JSON
        res = run(os.environ)
    logparse.emit(report(res), res, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
