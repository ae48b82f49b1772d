"""Export: int6 row quantizer, bank layout, quantization policy, artifact pack/unpack, size report."""
import builtins
import dataclasses
import hashlib
import io
import lzma
import os
import sys

import pytest
import torch

import train_gpt as tg
from conftest import main_in_process

DEFAULT_PAYLOAD_BYTES = 27_627_290  # SPEC §6.4 reconciliation with the reference log
CANDIDATES = tg.Hyperparameters().int6_clip_candidates  # the record's per-row clip quantiles
QUANT_FORMAT = "int6_per_row_v2"  # the artifact format this script reads and writes
MAGIC = {"rans": b"I6rA", "zstd": b"\x28\xb5\x2f\xfd"}  # the codec tags that start an artifact


def settings_of(h, config: dict) -> dict:
    """h's values of the settings an artifact records (config: what unpack_artifact returned)."""
    assert {"num_layers", "model_dim", "vocab_size", "num_heads"} <= set(config)
    return {name: getattr(h, name) for name in config}


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def contract_state(h, seed=0):
    """A state dict with the model's naming contract, shapes from h and the at-rest dtypes of SPEC §2.10."""
    g = torch.Generator().manual_seed(seed)
    L, d, kv, hid, nh = h.num_layers, h.model_dim, h.kv_dim, h.mlp_hidden, h.num_heads

    def r(*shape, dtype=torch.float32, std=0.05):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    s = {"tok_emb.weight": r(h.vocab_size, d, dtype=torch.bfloat16),
         "qo_bank": r(2 * L, d, d), "kv_bank": r(2 * L, kv, d),
         "mlp_up_bank": r(L, hid, d), "mlp_down_bank": r(L, d, hid),
         "bigram.embed.weight": r(h.bigram_vocab_size, h.bigram_dim, dtype=torch.bfloat16),
         "bigram.proj.weight": r(d, h.bigram_dim), "bigram.scale": torch.tensor(0.05),
         "smear.gate": r(d), "skip_weights": r(L // 2, d)}
    for i in range(L):
        s.update({f"blocks.{i}.attn_scale": r(d), f"blocks.{i}.mlp_scale": r(d), f"blocks.{i}.resid_mix": r(2, d),
                  f"blocks.{i}.attn.q_gain": r(nh), f"blocks.{i}.attn.attn_gate.weight": r(nh, d),
                  f"blocks.{i}.attn.attn_gate.bias": r(nh), f"blocks.{i}.attn.vr_lambda": r(2)})
    return s


# ---- quantizer ------------------------------------------------------------------------------------------------

def reference_rows(w, candidates):
    """Independent per-row loop over the clip candidates with torch.quantile (SPEC §6.3)."""
    qs, ss, errs = [], [], []
    for row in w.float():
        best = None
        for p in candidates:
            c = torch.quantile(row.abs(), p)
            s = torch.clamp(c / 31, min=1 / 31)
            q = torch.clamp(torch.round(torch.clamp(row, -c, c) / s), -31, 31)
            err = float((row - q * s).square().sum())
            if best is None or err < best[2]:  # strict: ties keep the earlier candidate
                best = (q, s, err)
        qs.append(best[0]), ss.append(best[1]), errs.append(best[2])
    return torch.stack(qs), torch.stack(ss), torch.tensor(errs)


def heavy_tailed(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[torch.rand(rows, cols, generator=g) < 0.002] *= 8  # outliers make clipping worth it on some rows
    return w


def test_quantizer_range_dtypes_and_scale_floor():
    w = torch.cat([heavy_tailed(64, 256), torch.randn(8, 256) * 1e-3, torch.zeros(2, 256)])
    q, s = tg.quantize_int6_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (w.shape[0],)
    assert int(q.min()) >= -31 and int(q.max()) <= 31
    assert bool((s.float() >= torch.tensor(1 / 31, dtype=torch.float16).float()).all())


def test_quantizer_picks_best_candidate_per_row():
    w = heavy_tailed(96, 384, seed=1)
    q, s = tg.quantize_int6_rows(w, CANDIDATES)
    q_ref, s_ref, err_ref = reference_rows(w, CANDIDATES)
    assert torch.equal(q, q_ref.to(torch.int8))
    assert torch.equal(s, s_ref.half())  # the clip is torch.quantile's, bit for bit
    # the search is not trivial here: several candidates win on different rows
    plain_q, plain_s, plain_err = reference_rows(w, (1.0,))
    assert (err_ref < plain_err).sum() > 0
    assert bool((err_ref <= plain_err).all())
    # with the stored fp16 scales the error stays within fp16 rounding of the plain max-abs grid's error
    err = (w - tg.dequantize_rows(q, s)).square().sum(dim=1)
    plain = (w - tg.dequantize_rows(plain_q.to(torch.int8), plain_s.half())).square().sum(dim=1)
    assert bool((err <= plain * (1 + 2e-3) + 1e-9).all())


def bank_slices_x30(seed=0):
    """Orthogonal-init-like bank slices [3, 128, 512] scaled x30, so many rows have max |w| > 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(3, 512, 128, generator=g)).Q.mT * 30 * torch.rand(3, 128, 1, generator=g)


@pytest.mark.parametrize("make", [lambda: heavy_tailed(200, 1536, seed=2) * 30, bank_slices_x30,
                                  lambda: torch.randn(7, 100) * 30], ids=["rows_x30", "bank_slices_x30", "short"])
def test_row_quantile_is_torch_quantile_bit_for_bit(make):
    x = make().abs()
    n = x.shape[-1]
    top = x.topk(tg.top_values_needed(n, CANDIDATES), dim=-1).values  # pinned: the top-k the exact quantile needs
    assert top.shape[-1] < n // 4  # only the top few values of each row are kept
    for p in CANDIDATES:
        want = torch.quantile(x, p, dim=-1, keepdim=True)
        assert torch.equal(tg._row_quantile(top, n, p), want), p  # pinned: bit-exact torch.quantile


def test_tensor_clip_is_torch_quantile_bit_for_bit(small_h):
    """A float tensor that is not 2-D is stored as int6 with one scale: the 0.9999984 quantile of |w| / 31."""
    w = (heavy_tailed(300, 400, seed=4) * 30).reshape(300, 20, 20)
    obj = tg.decode_artifact(tg.pack_artifact({"w": w}, small_h)[0])
    q, scale = obj["quantized"]["w"], obj["scales"]["w"]
    assert obj["qmeta"]["w"] == {"scheme": "per_tensor"}
    clip = torch.quantile(w.abs().flatten(), 0.9999984)
    assert torch.equal(scale, torch.tensor(float(clip) / 31, dtype=torch.float32)) and int(q.abs().max()) == 31


def test_quantizer_scales_match_torch_quantile_reference_on_bank_slices():
    w = bank_slices_x30()
    q, s = tg.quantize_int6_rows(w)
    q_ref, s_ref, _ = reference_rows(w.reshape(-1, w.shape[-1]), CANDIDATES)
    assert (s_ref > 1 / 31).float().mean() > 0.5  # most rows are above the scale floor: the clip matters
    assert torch.equal(s.reshape(-1), s_ref.half()) and torch.equal(q.reshape(-1, w.shape[-1]), q_ref.to(torch.int8))


def test_quantizer_ties_keep_earlier_candidate():
    # rows whose every |w| < 1 hit the 1/31 floor for all candidates: identical grids must give identical output
    w = torch.rand(16, 128) * 0.5
    q1, s1 = tg.quantize_int6_rows(w, (0.999, 1.0))
    q_ref, s_ref, _ = reference_rows(w, (0.999, 1.0))
    assert torch.equal(q1, q_ref.to(torch.int8)) and torch.equal(s1, s_ref.half())
    # a duplicated candidate list is a tie on every row and changes nothing
    q2, s2 = tg.quantize_int6_rows(w, (1.0, 1.0, 1.0))
    q3, s3 = tg.quantize_int6_rows(w, (1.0,))
    assert torch.equal(q2, q3) and torch.equal(s2, s3)


# ---- bank layout and policy -----------------------------------------------------------------------------------

def test_unbank_rebank_identity(small_h):
    state = contract_state(small_h)
    flat = tg.unbank_state(state, small_h.num_layers)  # pinned: the reference's unbanked state dict
    L = small_h.num_layers
    assert not any(k.endswith("_bank") for k in flat)
    assert torch.equal(flat[f"blocks.{L - 1}.attn.proj.weight"], state["qo_bank"][2 * L - 1])
    assert torch.equal(flat["blocks.0.attn.c_v.weight"], state["kv_bank"][L])
    assert flat["blocks.1.mlp.proj.weight"].shape == (small_h.model_dim, small_h.mlp_hidden)
    back = tg.rebank_state(flat, L)  # pinned: the inverse
    assert list(back) == list(state)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())


def test_rebank_reports_missing_slice(small_h):
    flat = tg.unbank_state(contract_state(small_h), small_h.num_layers)  # pinned: the reference's unbanked state
    del flat["blocks.1.mlp.fc.weight"]
    with pytest.raises(tg.UserError, match="mlp_up_bank"):
        tg.rebank_state(flat, small_h.num_layers)  # pinned: the inverse


def export_kinds(blob) -> dict:
    """How the artifact stores each (unbanked) tensor, read from its object: int6 per row or per tensor, fp16,
    fp32 (control tensors) or passthrough (not a float)."""
    obj = tg.decode_artifact(blob)
    kinds = {name: "int6_" + {"per_row": "rows", "per_tensor": "tensor"}[meta["scheme"]]
             for name, meta in obj["qmeta"].items()}
    for name, t in obj["passthrough"].items():
        kinds[name] = {torch.float16: "fp16", torch.float32: "fp32_control"}.get(t.dtype, "passthrough")
        assert t.is_floating_point() or obj["passthrough_orig_dtypes"][name] == str(t.dtype).removeprefix("torch.")
    return kinds


def test_policy_classes_and_payload_at_default_shapes():
    h = dataclasses.replace(tg.Hyperparameters(), artifact_codec="zstd", zstd_level=1)
    blob, stats = tg.pack_artifact(contract_state(h), h)
    kinds = export_kinds(blob)
    assert kinds["tok_emb.weight"] == "fp16" and kinds["bigram.proj.weight"] == "fp16"
    assert kinds["bigram.scale"] == "fp16"  # `bigram.scale` does not match the pattern `bigram_scale` (SPEC §6.2)
    assert kinds["bigram.embed.weight"] == "int6_rows" and kinds["blocks.3.attn.c_k.weight"] == "int6_rows"
    for name in ("smear.gate", "skip_weights", "blocks.0.resid_mix", "blocks.10.attn.attn_gate.bias",
                 "blocks.2.attn.vr_lambda", "blocks.4.attn.q_gain"):
        assert kinds[name] == "fp32_control", name
    assert sum(k == "int6_rows" for k in kinds.values()) == 6 * h.num_layers + 1
    assert stats.payload_bytes == DEFAULT_PAYLOAD_BYTES
    assert stats.baseline_bytes == 105_665_308  # baseline of payload_ratio 3.82x


# ---- pack / unpack --------------------------------------------------------------------------------------------

def assert_int6_rows_bound(w, got, candidates, name):
    """got = the int6 row grid of w: within half a step (+ fp16 rounding of the scale) where w is not clipped."""
    q, s = tg.quantize_int6_rows(w, candidates)
    scale = s.float().unsqueeze(1)
    inside = w.float().abs() <= 31 * scale * (1 - 2**-11)
    bound = scale / 2 + 32 * scale * 2**-11 + 1e-7  # half a step + fp16 rounding of the stored scale
    if w.dtype == torch.bfloat16:
        bound = bound + got.float().abs() * 2**-8  # final cast back to bf16
    err = (got.float() - w.float()).abs()
    assert bool((err <= bound)[inside].all()), name
    assert torch.equal(got, tg.dequantize_rows(q, s).to(w.dtype)), name


def test_pack_unpack_error_bounds(small_h):
    state = contract_state(small_h)
    state["extra.cube"] = torch.randn(4, 8, 16)  # non-2-D, above the keep-float threshold: per-tensor int6
    state["extra.steps"] = torch.arange(5)  # non-float: passthrough unchanged
    blob, stats = tg.pack_artifact(state, small_h)
    config, out = tg.unpack_artifact(blob)
    assert {"num_layers", "model_dim", "vocab_size"} <= set(config)
    assert config == {name: getattr(small_h, name) for name in config}
    assert set(out) == set(state)
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape for k, v in state.items())
    kinds = export_kinds(blob)
    banks = [name for name in state if name.endswith("_bank")]
    assert len(banks) == 4 and sum(k == "int6_rows" for k in kinds.values()) == sum(
        state[b].shape[0] for b in banks) + 2  # every bank slice, the bigram table and projection (> 256 values)
    for name, w in state.items():
        got = out[name]
        if name in banks:
            for j in range(w.shape[0]):
                assert_int6_rows_bound(w[j], got[j], small_h.int6_clip_candidates, f"{name}[{j}]")
            continue
        kind = kinds[name]
        if kind in ("passthrough", "fp32_control"):
            assert torch.equal(got, w), name
        elif kind == "fp16":
            assert torch.equal(got, w.half().to(w.dtype)), name
        elif kind == "int6_rows":
            assert_int6_rows_bound(w, got, small_h.int6_clip_candidates, name)
        else:
            assert kind == "int6_tensor"
            step = (w.abs().max() / 31).item()
            assert (got - w).abs().max().item() <= step / 2 + 1e-6
    assert kinds["extra.cube"] == "int6_tensor" and kinds["extra.steps"] == "passthrough"
    assert stats.compressed_bytes == len(blob) and stats.raw_torch_bytes > stats.compressed_bytes
    assert stats.payload_bytes < stats.baseline_bytes


@pytest.mark.parametrize("codec", ["rans", "zstd"])
def test_blob_starts_with_its_codec_tag_and_object_is_truthful(small_h, codec):
    h = dataclasses.replace(small_h, artifact_codec=codec)
    blob, stats = tg.pack_artifact(contract_state(h), h)
    assert blob[:4] == MAGIC[codec]
    obj = tg.decode_artifact(blob)
    assert len(torch_bytes(obj)) == stats.raw_torch_bytes
    assert obj["__quant_format__"] == QUANT_FORMAT and "int6" in QUANT_FORMAT
    assert set(obj) == {"__quant_format__", "__model_config__", "quantized", "scales", "dtypes", "passthrough", "qmeta",
                        "passthrough_orig_dtypes"}
    assert obj["__model_config__"]["num_layers"] == h.num_layers
    assert obj["qmeta"]["blocks.0.attn.c_q.weight"] == {"scheme": "per_row", "axis": 0}
    assert obj["passthrough_orig_dtypes"]["tok_emb.weight"] == "bfloat16"
    if codec == "zstd":  # the container of the earlier artifacts: zstd of the torch.save bytes
        zstd = pytest.importorskip("zstandard")
        assert len(zstd.ZstdDecompressor().decompress(blob)) == stats.raw_torch_bytes


def test_codecs_carry_the_same_object_and_any_is_read_whatever_the_setting(small_h):
    state = contract_state(small_h)
    blobs = {c: tg.pack_artifact(state, dataclasses.replace(small_h, artifact_codec=c))[0] for c in MAGIC}
    objs = {c: tg.decode_artifact(b) for c, b in blobs.items()}
    for part in ("quantized", "scales", "passthrough"):
        for name, t in objs["zstd"][part].items():
            assert torch.equal(objs["rans"][part][name], t) and objs["rans"][part][name].dtype == t.dtype, name
    assert {k: v for k, v in objs["rans"].items() if k not in ("quantized", "scales", "passthrough")} == \
        {k: v for k, v in objs["zstd"].items() if k not in ("quantized", "scales", "passthrough")}
    assert tg.pack_artifact(state, small_h)[0] == blobs["rans"]  # deterministic: same state, same bytes
    for blob in blobs.values():  # an old zstd artifact stays readable under the default codec
        config, loaded = tg.unpack_artifact(blob)
        assert config == settings_of(small_h, config) and set(loaded) == set(state)


def test_rans_refuses_values_outside_int6(small_h):
    obj = {"quantized": {"w": torch.tensor([[0, 31, -32]], dtype=torch.int8)}}
    with pytest.raises(ValueError, match="outside"):
        tg.encode_artifact(obj, dataclasses.replace(small_h, artifact_codec="rans"))


@pytest.mark.parametrize("package,codec", [("zstandard", "zstd"), ("constriction", "rans")])
def test_missing_codec_package_is_an_error(small_h, monkeypatch, package, codec):
    h = dataclasses.replace(small_h, artifact_codec=codec)
    blob, _ = tg.pack_artifact(contract_state(h), h)
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(tg.UserError, match=f"needs the `{package}` package"):
        tg.pack_artifact(contract_state(h), h)
    with pytest.raises(tg.UserError, match=f"needs the `{package}` package"):
        tg.unpack_artifact(blob)


@pytest.mark.parametrize("codec", ["rans", "zstd"])
def test_corrupt_and_foreign_blobs(small_h, codec):
    h = dataclasses.replace(small_h, artifact_codec=codec)
    blob, _ = tg.pack_artifact(contract_state(h), h)
    with pytest.raises(tg.UserError, match="not an artifact: starts with 504b0304"):
        tg.unpack_artifact(b"PK\x03\x04" + blob[4:])
    with pytest.raises(tg.UserError, match="truncated"):
        tg.unpack_artifact(blob[: len(blob) // 2])
    for at in (len(blob) // 2, len(blob) - 3):  # inside the header (rans) or the stream, and in the last word
        flipped = bytearray(blob)
        flipped[at] ^= 0xFF
        with pytest.raises(tg.UserError):
            tg.unpack_artifact(bytes(flipped))
    if codec == "rans":
        with pytest.raises(tg.UserError, match="words are corrupt"):
            tg.unpack_artifact(blob[:-4] + bytes(4))  # ANS words never end in a zero word
    old = dataclasses.replace(h, artifact_codec="zstd")
    with pytest.raises(tg.UserError, match="int8_clean_per_row_v1"):
        tg.unpack_artifact(tg.encode_artifact({"__quant_format__": "int8_clean_per_row_v1", "quantized": {}}, old))
    zstd = pytest.importorskip("zstandard")
    with pytest.raises(tg.UserError, match="not a readable torch.save"):
        tg.unpack_artifact(zstd.ZstdCompressor().compress(b"hello world"))


# ---- export to disk -------------------------------------------------------------------------------------------

def code_of(code_bytes, packed=False, packed_bytes=None):
    """A code identity with the given counted bytes (readable unless packed)."""
    packed_bytes = code_bytes if packed else (packed_bytes or code_bytes // 3)
    return tg.code_identity()._replace(source="", code_bytes=code_bytes, code_sha256="c" * 64, source_sha256="s" * 64,
                                       packed=packed, packed_bytes=packed_bytes)


@pytest.mark.parametrize("packed", [False, True])
def test_export_and_load_roundtrip(small_h, capsys, monkeypatch, packed):
    monkeypatch.delenv("RANK", raising=False)
    state = contract_state(small_h)
    rep = tg.export_artifact(state, small_h, code_of(1234, packed, packed_bytes=400))
    assert not rep.over_limit and rep.model_bytes == os.path.getsize(small_h.artifact_path)
    assert rep.total_bytes == rep.model_bytes + 1234
    out = capsys.readouterr().out
    assert f"serialized model_bytes:{rep.model_bytes} payload_bytes:{rep.stats.payload_bytes} " in out
    assert f"Total submission int6+zstd: {rep.model_bytes + 1234} bytes" in out
    form, packed_total = ("packed", rep.model_bytes + 1234) if packed else ("readable", rep.model_bytes + 400)
    assert (f"sha256:{rep.sha256} model_bytes:{rep.model_bytes} code_bytes:1234 code:{form} "
            f"total_bytes:{rep.total_bytes} limit:{small_h.artifact_limit_bytes} packed_total_bytes:{packed_total}\n") in out
    assert "artifact_over_limit" not in out
    art = tg.load_artifact(small_h.artifact_path)
    loaded = art.state
    assert set(loaded) == set(state) and all(loaded[k].dtype == v.dtype for k, v in state.items())
    assert art.config == settings_of(small_h, art.config) and hashlib.sha256(art.blob).hexdigest() == rep.sha256


def test_over_limit_is_reported(small_h, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    h = dataclasses.replace(small_h, artifact_limit_bytes=100)
    rep = tg.export_artifact(contract_state(h), h, code_of(50))
    assert rep.over_limit
    excess = rep.total_bytes - 100
    assert f"artifact_over_limit total_bytes:{rep.total_bytes} limit:100 excess:{excess}" in capsys.readouterr().out


def fail_writes_under(monkeypatch, folders, err=28):
    """Every file opened for writing under one of `folders` fails with errno `err` (28 = ENOSPC: disk full)."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and any(str(path).startswith(str(f)) for f in folders):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", failing_open)


def test_failed_artifact_write_keeps_the_weights_next_to_the_log(small_h, monkeypatch, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir(), out.mkdir()
    h = dataclasses.replace(small_h, artifact_path=str(out / "model.int6.ptz"), log_dir=str(logs), run_id="r1")
    state = contract_state(h)
    fail_writes_under(monkeypatch, [out])
    with pytest.raises(tg.RunFailed) as e:
        tg.export_artifact(state, h, code_of(0))
    rescue = logs / "r1.rescued.model.int6.ptz"
    assert e.value.reason == "write_failed" and "\n" not in str(e.value)
    assert f"cannot write the artifact {out / 'model.int6.ptz'} (ENOSPC: No space left on device)" in str(e.value)
    assert f"the trained weights are saved in {rescue} (score them with EVAL_ONLY=1 ARTIFACT_PATH={rescue})" in str(
        e.value)
    assert os.listdir(out) == []  # no partial or temporary file where the artifact should be
    monkeypatch.undo()
    art = tg.load_artifact(str(rescue))  # the very artifact: loadable, scoreable
    assert art.blob == tg.pack_artifact(state, h)[0] and art.config == settings_of(h, art.config)


def test_write_failure_everywhere_says_the_weights_are_lost(small_h, monkeypatch, tmp_path):
    h = dataclasses.replace(small_h, log_dir=str(tmp_path), run_id="r2")
    fail_writes_under(monkeypatch, ["/"], err=27)  # 27 = EFBIG: a file-size limit applies to every file
    with pytest.raises(tg.RunFailed, match=r"\(EFBIG: File too large\), nor .*r2\.rescued\.model\.int6\.ptz "
                                           r"\(EFBIG: File too large\).*: the trained weights are lost"):
        tg.export_artifact(contract_state(h), h, code_of(0))
    assert os.listdir(tmp_path) == []


def test_load_missing_or_corrupt_file(small_h, tmp_path):
    with pytest.raises(tg.UserError, match=r"cannot read artifact \(No such file or directory\); check "
                                               r"ARTIFACT_PATH$"):
        tg.load_artifact(str(tmp_path / "absent.ptz"))
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(tg.UserError, match="bad.ptz: not an artifact"):
        tg.load_artifact(str(bad))


def test_only_the_current_format_is_read(small_h):
    blob, _ = tg.pack_artifact(contract_state(small_h), small_h)
    old = {k: v for k, v in tg.decode_artifact(blob).items() if k != "__model_config__"}
    old["__quant_format__"] = "int6_per_row_v1"  # the previous format had no model settings
    with pytest.raises(tg.UserError, match="'int6_per_row_v1' is not 'int6_per_row_v2'; re-export"):
        tg.unpack_artifact(tg.encode_artifact(old, dataclasses.replace(small_h, artifact_codec="zstd")))
    config, state = tg.unpack_artifact(blob)  # the recorded settings rebuild the same model
    assert config == settings_of(small_h, config)
    tg.build_model(dataclasses.replace(tg.Hyperparameters(), **config)).load_state_dict(state, strict=True)


def test_the_format_keeps_the_switch_names_it_was_defined_with(small_h):
    blob, _ = tg.pack_artifact(contract_state(small_h), small_h)
    recorded = tg.decode_artifact(blob)["__model_config__"]  # artifacts written before the switches were renamed load
    assert {"use_smeargate", "use_value_residual", "use_gated_attention"} <= set(recorded)
    config = tg.unpack_artifact(blob)[0]
    assert "smeargate_enabled" not in recorded and config == settings_of(small_h, config)


# ---- hostile and inconsistent artifacts -------------------------------------------------------------------------

def zstd_frame(raw: bytes, declare_size: bool = True) -> bytes:
    zstd = pytest.importorskip("zstandard")
    if declare_size:
        return zstd.ZstdCompressor(level=3).compress(raw)
    stream = zstd.ZstdCompressor(level=3).compressobj()  # a streamed frame records no content size
    return stream.compress(raw) + stream.flush()


def test_a_frame_claiming_a_terabyte_is_refused_before_allocating():
    zstd = pytest.importorskip("zstandard")
    stream = zstd.ZstdCompressor(level=1).compressobj(size=2**40)  # the header declares 1 TiB
    blob = stream.compress(b"x" * 100) + stream.flush(zstd.COMPRESSOBJ_FLUSH_BLOCK)
    assert len(blob) < 64 and zstd.frame_content_size(blob) == 2**40
    with pytest.raises(tg.UserError, match=f"declares {2**40} decompressed bytes, more than the {2**30}"):
        tg.unpack_artifact(blob)


@pytest.mark.parametrize("declare_size", [True, False])
def test_decompression_stops_at_the_bound(monkeypatch, declare_size):
    monkeypatch.setattr(tg, "ARTIFACT_RAW_LIMIT_BYTES", 1 << 20)  # pinned: the 1 GiB bound, lowered to test it
    blob = zstd_frame(bytes(8 << 20), declare_size)  # 8 MiB of zeros: a few hundred bytes compressed
    with pytest.raises(tg.UserError, match="declares 8388608" if declare_size else "expands to more than the"):
        tg.unpack_artifact(blob)


def test_streamed_frames_decode_and_truncation_is_detected(small_h):
    zstd = pytest.importorskip("zstandard")
    small_h = dataclasses.replace(small_h, artifact_codec="zstd")
    blob, _ = tg.pack_artifact(contract_state(small_h), small_h)
    raw = zstd.ZstdDecompressor().decompress(blob)
    streamed = zstd_frame(raw, declare_size=False)
    assert zstd.frame_content_size(streamed) == -1
    config, state = tg.unpack_artifact(streamed)
    assert config == settings_of(small_h, config) and set(state) == set(contract_state(small_h))
    with pytest.raises(tg.UserError, match="truncated"):
        tg.unpack_artifact(streamed[:len(streamed) // 2])


def test_a_hostile_pickle_is_refused_without_torchs_advice_to_load_it_anyway():
    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    buf = io.BytesIO()
    torch.save({"__quant_format__": QUANT_FORMAT, "x": Hostile()}, buf)
    with pytest.raises(tg.UserError) as e:
        tg.unpack_artifact(zstd_frame(buf.getvalue()))
    msg = str(e.value)
    assert "not a readable torch.save object (UnpicklingError:" in msg and "system" in msg and "\n" not in msg
    assert "weights_only" not in msg and "Re-running" not in msg


def artifact_object(h):
    """The torch object inside a packed artifact of contract_state(h), to be damaged and re-packed."""
    blob, _ = tg.pack_artifact(contract_state(h), h)
    return tg.decode_artifact(blob)


def repack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zstd_frame(buf.getvalue())


@pytest.mark.parametrize("damage, message", [
    (lambda o: o["__model_config__"].update(model_dim=32), "16 of the wrong shape (first: bigram.proj.weight (64, 16), model (32, 16))"),
    (lambda o: o["__model_config__"].update(num_layers=3), "missing"),
    (lambda o: o["passthrough"].pop("smear.gate"), "1 missing (first: smear.gate)"),
    (lambda o: o["passthrough"].update(extra=torch.zeros(3)), "1 unexpected (first: extra)"),
    (lambda o: o["__model_config__"].update(num_layers="2"), "records NUM_LAYERS='2' (str), expected int"),
    (lambda o: o["__model_config__"].update(use_smeargate=1), "records SMEARGATE_ENABLED=1 (int), expected bool"),
    (lambda o: o["__model_config__"].update(num_heads=0), "settings that are not valid (invalid settings: NUM_HEADS=0"),
    (lambda o: o["scales"].update({next(iter(o["scales"])): "x"}), "artifact tensors are inconsistent"),
])
def test_tensors_that_do_not_fit_the_recorded_model_are_one_artifact_error(small_h, tmp_path, damage, message):
    obj = artifact_object(small_h)
    damage(obj)
    path = tmp_path / "damaged.ptz"
    path.write_bytes(repack(obj))
    with pytest.raises(tg.UserError) as e:
        tg.load_artifact(str(path))
    assert message in str(e.value) and str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_eval_only_refuses_a_damaged_artifact_before_loading_any_data(small_h, tmp_path, monkeypatch, capsys):
    obj = artifact_object(small_h)
    obj["__model_config__"]["model_dim"] = 32
    path = tmp_path / "damaged.ptz"
    path.write_bytes(repack(obj))
    env = {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(path), "DATA_PATH": str(tmp_path / "no_data"), "DEVICE": "cpu",
           "LOG_DIR": str(tmp_path / "logs"), "PATH": os.environ.get("PATH", "")}
    assert main_in_process(env, monkeypatch) == 2  # a user error: not the missing shards, not a traceback
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "of the wrong shape" in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_a_rans_header_that_expands_past_the_bound_is_refused(small_h, monkeypatch):
    blob, _ = tg.pack_artifact(contract_state(small_h), small_h)  # rans, the default codec
    assert blob[:4] == MAGIC["rans"]
    monkeypatch.setattr(tg, "ARTIFACT_RAW_LIMIT_BYTES", 1000)  # pinned: the bound, below this artifact's header
    with pytest.raises(tg.UserError, match="header expands to more than the 1000 bytes"):
        tg.unpack_artifact(blob)


def test_a_rans_header_declaring_too_many_values_is_refused_before_decoding(small_h, monkeypatch):
    blob = tg.pack_artifact(contract_state(small_h), small_h)[0]  # rans, the default codec
    start = len(MAGIC["rans"]) + 8
    end = start + int.from_bytes(blob[len(MAGIC["rans"]):start], "little")
    header = torch.load(io.BytesIO(lzma.decompress(blob[start:end])), weights_only=True)
    header["__rans__"]["shapes"][0] = [2**20, 2**20]  # 2^40 values: would allocate terabytes
    packed = lzma.compress(torch_bytes(header))
    forged = MAGIC["rans"] + len(packed).to_bytes(8, "little") + packed + blob[end:]
    with pytest.raises(tg.UserError, match="impossible or too many int6 values"):
        tg.unpack_artifact(forged)
