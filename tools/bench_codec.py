#!/usr/bin/env python3
"""Artifact codec benchmark: one int6 object under every candidate codec, with bytes, ratio to zstd-22 and the
encode and decode time on one CPU thread.

    python3 tools/bench_codec.py --artifact final_model.int6.ptz    # a trained model's payload (e.g. after bash run.sh)
    python3 tools/bench_codec.py --synthetic                        # the record's shape, trained-like int6 values

Codecs: `zstd-22`, `brotli-11` (window 2^24) and `lzma-9e` (preset 9 | EXTREME) compress the torch.save bytes of the
object; `rans` is train_gpt.py's ARTIFACT_CODEC=rans (each int6 tensor's values rANS-coded with the tensor's own
63-value histogram by `constriction`, everything else lzma-9e). zstd-22 and rans run through train_gpt.py's own
encode_artifact / decode_artifact; decode times include torch.load of the object, and every codec's output is
decoded and compared with the object. Prints a Markdown table; `--json PATH|-` as in every tool.

--synthetic builds the int6 object of the default Hyperparameters (11 layers, 512 wide, the record's export policy:
27,627,290 payload bytes) from weights drawn per matrix type with the statistics of the trained CPU demo model
(`bash run.sh`: 4 layers x 128, 200 steps), see SYNTHETIC_TYPES: each row is Gaussian (Student-t with `dof` degrees
of freedom where the demo's rows had excess kurtosis), times a per-row factor exp(N(0, row_logsd)) and a per-column
factor exp(N(0, col_logsd)), times the type's relative std and one global std; train_gpt.py's own quantizer makes
the int6 values and fp16 scales. The global std (--synthetic-std, default 0.205) is set so that zstd-22 of the object
(15,692,660 bytes with seed 0) is within 0.5 % of the reference record's 15,760,794 bytes for this same payload:
~4.5 bits per int6 value, as in the reference. Float tensors kept as floats get trained-like noise around their
initial values. zstd-22's size moves by ~2 % between draws of the same distribution (seeds 0, 1, 2: 15,692,660,
15,957,652, 15,648,735 bytes), rans's by 0.05 % (15,435,360, 15,439,120, 15,432,108).
Exit status: 0, or 2 after one `error:` line (an unreadable artifact, a missing package).
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import logparse  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402

# matrix type (substring of the name) -> (std relative to attn.c_q, row log-std spread, column log-std spread,
# Student-t degrees of freedom or 0 = Gaussian), measured on the int6 weights of the trained CPU demo model
SYNTHETIC_TYPES = {"attn.c_q": (1.00, 0.063, 0.063, 0), "attn.proj": (0.72, 0.056, 0.074, 0),
                   "attn.c_k": (1.04, 0.067, 0.109, 0), "attn.c_v": (1.08, 0.065, 0.098, 0),
                   "mlp.fc": (1.00, 0.20, 0.073, 0), "mlp.proj": (0.49, 0.032, 0.27, 16),
                   "bigram.embed": (4.4, 0.178, 0.019, 0)}
FLOAT_NOISE_STD = {"large": 0.3, "small": 0.2}  # trained float tensors: >= 4096 elements (embeddings), control


def unit_samples(rng: np.random.Generator, shape, dof: int) -> np.ndarray:
    """Unit-variance Gaussian (dof 0) or Student-t samples."""
    if not dof:
        return rng.standard_normal(shape)
    return rng.standard_t(dof, shape) * ((dof - 2) / dof) ** 0.5


# each bank's slices in order: slice k * num_layers + i is matrix type k of layer i (the model's bank layout)
BANK_TYPES = {"qo_bank": ("attn.c_q", "attn.proj"), "kv_bank": ("attn.c_k", "attn.c_v"), "mlp_up_bank": ("mlp.fc",),
              "mlp_down_bank": ("mlp.proj",)}


def synthetic_matrix(rng: np.random.Generator, kind: str, shape, std: float) -> torch.Tensor:
    rel, row_logsd, col_logsd, dof = SYNTHETIC_TYPES[kind]
    rows, cols = shape
    w = (unit_samples(rng, (rows, cols), dof) * np.exp(rng.standard_normal((rows, 1)) * row_logsd)
         * np.exp(rng.standard_normal((1, cols)) * col_logsd))
    return torch.from_numpy(w * rel * std)


def synthetic_state(h: tg.Hyperparameters, std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of h's model with trained-like weights (see the module docstring); a bank's slices are drawn one
    matrix at a time, in slice order."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = tg.build_model(h, tg.single_process_runtime())
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        kind = BANK_TYPES.get(name) or next((k for k in SYNTHETIC_TYPES if k in name), None)
        if isinstance(kind, tuple):
            out[name] = torch.stack([synthetic_matrix(rng, kind[j // h.num_layers], t.shape[1:], std)
                                     for j in range(t.shape[0])]).to(t.dtype)
        elif kind is not None:
            out[name] = synthetic_matrix(rng, kind, t.shape, std).to(t.dtype)
        elif t.is_floating_point() and t.numel() > 1:
            noise = FLOAT_NOISE_STD["large" if t.numel() >= 4096 else "small"]
            out[name] = (t.float() + torch.from_numpy(rng.standard_normal(tuple(t.shape))).float() * noise).to(t.dtype)
        else:
            out[name] = t
    return out


def int6_object(state: dict, h: tg.Hyperparameters) -> dict:
    """The int6 object train_gpt.py exports for `state` (its quantizer and export policy)."""
    return tg.decode_artifact(tg.pack_artifact(state, h)[0])


def synthetic_object(std: float, seed: int = 0) -> dict:
    h = tg.Hyperparameters()
    return int6_object(synthetic_state(h, std, seed), h)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_object(raw: bytes) -> dict:
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def generic_codecs() -> dict:
    """name -> (compress(bytes) -> bytes, decompress(bytes) -> bytes): generic compressors of the torch.save bytes
    that train_gpt.py does not offer."""
    try:
        import brotli
    except ImportError:
        raise toolkit.ToolError("bench_codec needs the `brotli` package (pip install -r requirements-dev.txt)") from None
    return {"brotli-11": (lambda raw: brotli.compress(raw, quality=11, lgwin=24), brotli.decompress),
            "lzma-9e": (lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}


def same_object(a: dict, b: dict) -> bool:
    """The two int6 objects hold equal tensors (values and dtypes) and equal metadata."""
    for part in ("quantized", "scales", "passthrough"):
        if a[part].keys() != b[part].keys():
            return False
        if not all(a[part][k].dtype == b[part][k].dtype and torch.equal(a[part][k], b[part][k]) for k in a[part]):
            return False
    meta = lambda o: {k: v for k, v in o.items() if k not in ("quantized", "scales", "passthrough")}
    return meta(a) == meta(b)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(obj: dict) -> list[dict]:
    """One row per codec: bytes, encode_s, decode_s, decoded_identical."""
    raw = torch_bytes(obj)
    rows = []
    for codec in ("zstd", "rans"):
        h = tg.Hyperparameters(artifact_codec=codec)
        blob, enc_s = timed(tg.encode_artifact, obj, h)
        back, dec_s = timed(tg.decode_artifact, blob)
        rows.append({"codec": "zstd-22" if codec == "zstd" else "rans", "bytes": len(blob), "encode_s": enc_s,
                     "decode_s": dec_s, "decoded_identical": same_object(obj, back)})
    for name, (compress, decompress) in generic_codecs().items():
        blob, enc_s = timed(compress, raw)
        back, dec_s = timed(lambda b: torch_object(decompress(b)), blob)
        rows.append({"codec": name, "bytes": len(blob), "encode_s": enc_s, "decode_s": dec_s,
                     "decoded_identical": same_object(obj, back)})
    base = rows[0]["bytes"]
    for r in rows:
        r["ratio_vs_zstd"] = r["bytes"] / base
    return rows


def describe(obj: dict) -> dict:
    values = sum(q.numel() for q in obj["quantized"].values())
    payload = sum(t.numel() * t.element_size() for part in ("quantized", "scales", "passthrough")
                  for t in obj[part].values())
    return {"int6_values": values, "payload_bytes": payload, "torch_save_bytes": len(torch_bytes(obj))}


def render(source: str, info: dict, rows: list[dict]) -> str:
    lines = [f"bench_codec source:{source} int6_values:{info['int6_values']} payload_bytes:{info['payload_bytes']} "
             f"torch_save_bytes:{info['torch_save_bytes']} threads:{torch.get_num_threads()}", "",
             "| codec | bytes | vs zstd-22 | encode s | decode s | decoded identical |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['bytes']:,} | {r['ratio_vs_zstd']:.4f} | {r['encode_s']:.1f} | "
                     f"{r['decode_s']:.2f} | {'yes' if r['decoded_identical'] else 'NO'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = toolkit.cli_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="an artifact written by train_gpt.py (any codec)")
    src.add_argument("--synthetic", action="store_true", help="the record's shape with trained-like values")
    p.add_argument("--synthetic-std", type=toolkit.positive_float, default=0.205, help="global weight std of --synthetic (default 0.205)")
    p.add_argument("--seed", type=toolkit.non_negative_int, default=0, help="seed of --synthetic (default 0)")
    p.add_argument("--threads", type=toolkit.int_in(1, 1024), default=1, help="torch threads (default 1: one CPU core)")
    p.add_argument("--json", default=None, metavar="PATH|-", help="also write the figures as JSON (- = stdout only)")
    return p


@toolkit.entry(tg.UserError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    toolkit.check_writable(args.json)
    torch.set_num_threads(args.threads)
    if args.synthetic:
        obj, source = synthetic_object(args.synthetic_std, args.seed), f"synthetic(std={args.synthetic_std})"
    else:
        obj, source = tg.decode_artifact(tg.load_artifact(args.artifact).blob), args.artifact
    info = describe(obj)
    rows = measure(obj)
    logparse.emit(render(source, info, rows), {"source": source, **info, "rows": rows}, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
