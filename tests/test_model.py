"""Model section: parameter contract, shapes, losses, optional features, RoPE, hashing, causality, QAT, dtypes."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY, breaks_under_compile, probed_runtime


def make(h, seed=0):
    torch.manual_seed(seed)
    return tg.GPT(h)


def randomize(model, seed=1, std=0.2):
    """Replace every parameter with noise so every path (W_o, W_down, bigram table, gates) is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def ids(h, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, h.vocab_size, (batch, h.train_seq_len), generator=g)


def numels(model):
    return {n: p.numel() for n, p in model.named_parameters()}


def test_default_parameter_count_and_names():
    model = tg.GPT(tg.Hyperparameters())
    assert sum(p.numel() for p in model.parameters()) == 26_744_007
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 1536, 512) and shapes["mlp_down_bank"] == (11, 512, 1536)
    assert shapes["tok_emb.weight"] == (1024, 512) and shapes["skip_weights"] == (5, 512)
    assert shapes["bigram.embed.weight"] == (1024, 128) and shapes["bigram.proj.weight"] == (512, 128)
    assert shapes["bigram.scale"] == () and shapes["smear.gate"] == (512,)
    assert shapes["blocks.10.resid_mix"] == (2, 512) and shapes["blocks.10.attn.q_gain"] == (8,)
    assert shapes["blocks.0.attn.attn_gate.weight"] == (8, 512) and shapes["blocks.0.attn.attn_gate.bias"] == (8,)
    assert shapes["blocks.3.attn.vr_lambda"] == (2,)
    assert "rotary.inv_freq" not in model.state_dict()


def test_output_shapes_and_reductions(tiny):
    h = tiny()
    model = randomize(make(h))
    x, y = ids(h), ids(h, seed=4)
    logits = model.forward_logits(x)
    assert logits.shape == (2, h.train_seq_len, h.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= h.logit_softcap
    per_token = model(x, y, reduction="none")
    assert per_token.shape == y.shape
    torch.testing.assert_close(model(x, y), per_token.mean())
    torch.testing.assert_close(model(x, y, reduction="sum"), per_token.sum())
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    torch.testing.assert_close(per_token, expected)


def test_logits_are_soft_capped_tied_projection(tiny):
    h = tiny(logit_softcap=5.0)
    model = randomize(make(h), std=1.0)
    x = ids(h)
    raw = F.linear(model.hidden(x), model.tok_emb.weight)
    torch.testing.assert_close(model.forward_logits(x), 5.0 * torch.tanh(raw / 5.0))


FEATURES = [
    (dict(smeargate_enabled=False), lambda n: n.startswith("smear.")),
    (dict(bigram_vocab_size=0), lambda n: n.startswith("bigram.")),
    (dict(value_residual_enabled=False), lambda n: n.endswith("attn.vr_lambda")),
    (dict(gated_attention_enabled=False), lambda n: ".attn.attn_gate." in n),
]


@pytest.mark.parametrize("override,owned", FEATURES)
def test_feature_off_removes_exactly_its_parameters(tiny, override, owned):
    full, reduced = numels(make(tiny())), numels(make(tiny(**override)))
    removed = {n: c for n, c in full.items() if owned(n)}
    assert removed, "feature owns no parameters in the full model"
    assert reduced == {n: c for n, c in full.items() if not owned(n)}


@pytest.mark.parametrize("override", [dict(ln_scale=True), dict(xsa_last_n=0), dict(xsa_last_n=2)])
def test_parameter_free_features_change_output_only(tiny, override):
    base, other = randomize(make(tiny())), make(tiny(**override))
    assert numels(base) == numels(other)
    other.load_state_dict(base.state_dict())
    x = ids(tiny())
    assert not torch.allclose(base.forward_logits(x), other.forward_logits(x), atol=1e-4)


@pytest.mark.parametrize("override", [d for d, _ in FEATURES])
def test_features_off_still_run(tiny, override):
    h = tiny(**override)
    model = randomize(make(h))
    loss = model(ids(h), ids(h, seed=5))
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == ({"blocks.0.attn.vr_lambda"} if h.value_residual_enabled else set())  # layer 0 has no v0


def test_layer_specs_xsa_on_the_last_layers_and_ln_scale(tiny):
    blocks = make(tiny(num_layers=5, xsa_last_n=2, ln_scale=True)).blocks
    assert [b.attn.xsa for b in blocks] == [False, False, False, True, True]
    assert [round(b.norm_scale, 6) for b in blocks] == [round(1 / math.sqrt(i + 1), 6) for i in range(5)]
    assert all(b.norm_scale == 1.0 for b in make(tiny(num_layers=5)).blocks)


def test_init_is_deterministic_and_follows_orthoinit(tiny):
    h = tiny()
    a, b, c = make(h, seed=7), make(h, seed=7), make(h, seed=8)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.qo_bank, c.qo_bank) and not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    n = h.num_layers
    for w in (a.qo_bank[0], a.kv_bank[n - 1], a.kv_bank[n], a.mlp_up_bank[1].T):  # columns/rows orthonormal
        torch.testing.assert_close(w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w,
                                   torch.eye(min(w.shape)), atol=1e-5, rtol=0)
    assert a.qo_bank[n:].abs().sum() == 0 and a.mlp_down_bank.abs().sum() == 0
    assert a.bigram.embed.weight.abs().sum() == 0 and a.bigram.scale.item() == pytest.approx(0.05)
    gate = a.blocks[0].attn.attn_gate
    assert gate.weight.abs().sum() == 0 and torch.all(gate.bias == 4.0)
    assert torch.all(a.blocks[1].attn.q_gain == h.qk_gain_init)
    assert torch.equal(a.blocks[1].resid_mix, torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))


def rope_head(tiny, rope_dims=16):
    """A model whose heads have the record's 64 dims and 16 RoPE dims (base 10000, training length 1024)."""
    return make(tiny(num_layers=1, model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=rope_dims))


def rope_frequencies(rotary, seq_len):
    """The per-pair angle step of the (cos, sin) tables at length seq_len: the angle at position 1."""
    cos, sin = rotary(seq_len)
    return torch.atan2(sin[1], cos[1])


def test_rope_ntk_base_and_frequencies(tiny):
    rotary = rope_head(tiny).rotary
    long = rope_frequencies(rotary, 2048)  # beyond the training length: NTK base 1e4 * 2^(16/14) = 22081.79
    assert long.shape == (8,)
    torch.testing.assert_close(long, torch.tensor([22081.79 ** (-2 * j / 16) for j in range(8)]), rtol=1e-5, atol=0)
    assert long[1].item() == pytest.approx(0.2864, abs=1e-4) and long[7].item() == pytest.approx(1.581e-4, rel=1e-3)
    base = torch.tensor([1e4 ** (-2 * j / 16) for j in range(8)])
    for seq_len in (512, 1024):  # up to the training length: the base itself
        torch.testing.assert_close(rope_frequencies(rotary, seq_len), base, rtol=1e-5, atol=0)
    cos, sin = rotary(6)
    angles = torch.outer(torch.arange(6.0), base)  # angle of pair j at position t: t * freq_j
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    assert rope_head(tiny, rope_dims=0).rotary(64)[0].shape == (64, 32)  # ROPE_DIMS=0: the whole head


def test_rotary_rotates_half_split_pairs_of_the_first_rope_dims(tiny):
    """Attention's keys as the backend receives them = RMS-normed W_k x rotated: pair (j, j + 8) of the first 16
    dims by angle position * freq_j, the other 48 dims passed through."""
    seen, inputs = {}, {}

    def spy(q, k, v):
        seen["k"] = k
        return tg.sdpa_attention(q, k, v)

    model = randomize(tg.GPT(tiny(num_layers=1, model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16), spy))
    attn = model.blocks[0].attn
    attn.register_forward_pre_hook(lambda m, args: inputs.update(x=args[0], w_k=args[1][1]))
    model.forward_logits(torch.arange(6)[None] % 128)
    x = F.rms_norm(F.linear(inputs["x"], inputs["w_k"]).view(1, 6, 1, 64), (64,))  # [B, T, Hkv, D] before RoPE
    out = seen["k"]
    torch.testing.assert_close(out[..., 16:], x[..., 16:], rtol=0, atol=0)  # 48 dims pass through
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    ang = torch.tensor(1e4 ** (-2 * 3 / 16))  # position 1, pair (3, 3 + 8)
    x1, x2 = x[0, 1, 0, 3], x[0, 1, 0, 11]
    torch.testing.assert_close(out[0, 1, 0, 3], x1 * ang.cos() + x2 * ang.sin())
    torch.testing.assert_close(out[0, 1, 0, 11], x2 * ang.cos() - x1 * ang.sin())


def bigram_bucket_ids(tiny, ids, buckets=1024):
    """The bucket of every position, read through the model's bigram module: a 1-dim table whose row b holds b,
    projected by ones with scale 1 (int ids < 2^24 are exact in fp32)."""
    model = make(tiny(bigram_vocab_size=buckets, bigram_dim=1))
    with torch.no_grad():
        model.bigram.embed.weight.copy_(torch.arange(float(buckets))[:, None])
        model.bigram.proj.weight.fill_(1.0)
        model.bigram.scale.fill_(1.0)
    return model.bigram(ids, torch.float32)[..., 0].long()


def test_bigram_buckets(tiny):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1024, (3, 50), generator=g)
    b = bigram_bucket_ids(tiny, t)
    assert b.shape == t.shape
    assert torch.all(b[:, 0] == 1023)  # position 0 has no previous token: the last bucket
    assert b[:, 1:].min() >= 0 and b[:, 1:].max() <= 1022
    assert b[1, 7].item() == ((36313 * int(t[1, 7])) ^ (27191 * int(t[1, 6]))) % 1023
    assert len(torch.unique(b[:, 1:])) > 100  # spreads over the buckets


def test_every_block_is_identity_at_init(tiny):
    h = tiny(num_layers=3, xsa_last_n=2)
    model = make(h)
    g = torch.Generator().manual_seed(0)
    x, x0 = (torch.randn(2, 8, h.model_dim, generator=g) for _ in range(2))
    v0 = torch.randn(2, 8, h.num_kv_heads, h.head_dim, generator=g)
    banks, rope = model.banks(torch.float32), model.rotary(8)
    for block in model.blocks:
        out, _ = block(x, x0, v0 if block.index else None, rope, banks)
        torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_model_is_causal(tiny):
    h = tiny()
    model = randomize(make(h))
    x = ids(h)
    t = 13
    changed = x.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % h.vocab_size
    a, b = model.forward_logits(x), model.forward_logits(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


def test_sdpa_backend_matches_explicit_gqa_attention():
    name, fn, skipped = tg.with_attention(tg.single_process_runtime(), tg.Hyperparameters(**TINY)).attention
    assert name == "sdpa" and skipped == (("fa3", "needs CUDA"), ("fa4", "needs CUDA"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, n, 8, generator=g) for n in (4, 2, 2))
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads kv head h // 2
    scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    torch.testing.assert_close(fn(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_xsa_removes_own_value_component(tiny):
    """On an XSA layer the attention output (read through W_o = I) is the backend's output less its component along
    the position's own value: orthogonal to it, and adding the component back gives the backend's output."""
    h = tiny(num_layers=1, xsa_last_n=1, gated_attention_enabled=False, value_residual_enabled=False)
    seen = {}

    def spy(q, k, v):
        seen["y"], seen["v"] = tg.sdpa_attention(q, k, v), v
        return seen["y"]

    model = randomize(tg.GPT(h, spy))
    with torch.no_grad():
        model.qo_bank[1].copy_(torch.eye(h.model_dim))  # W_o of layer 0
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.update(out=out[0]))
    model.forward_logits(ids(h)[:1])
    y, v = seen["y"], seen["v"]
    out = seen["out"].view_as(y)
    own = F.normalize(v.repeat_interleave(h.num_heads // h.num_kv_heads, dim=2), dim=-1)
    assert (out * own).sum(-1).abs().max() < 1e-5 and (y * own).sum(-1).abs().max() > 0.1
    torch.testing.assert_close(out + (y * own).sum(-1, keepdim=True) * own, y)


def test_qat_fake_quant_matches_export_grid(tiny):
    h = tiny()
    model = randomize(make(h)).train()
    model.qat_active = True
    banks = model.banks(torch.float32)
    for got, bank in zip(banks, (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank)):
        torch.testing.assert_close(got, tg.dequantize_rows(*tg.quantize_int6_rows(bank, h.int6_clip_candidates)),
                                   rtol=0, atol=0)
        assert not torch.equal(got, bank)
    model.eval()  # QAT acts only while training
    raw = (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank)
    assert all(torch.equal(a, b) for a, b in zip(model.banks(torch.float32), raw))


def test_qat_reaches_bigram_table_and_passes_gradients(tiny):
    h = tiny()
    model = randomize(make(h)).train()
    x, y = ids(h), ids(h, seed=5)
    table = model.bigram.embed.weight
    expected = model.bigram.proj(tg.dequantize_rows(*tg.quantize_int6_rows(table))[bigram_bucket_ids(tiny, x, 64)])
    torch.testing.assert_close(model.bigram(x, torch.float32, model.clips), expected * model.bigram.scale)
    model.qat_active = True
    model(x, y).backward()
    assert model.qo_bank.grad.abs().sum() > 0 and table.grad.abs().sum() > 0


def test_qat_switch_retraces_under_compile(tiny):
    """Switching QAT on compiles a second graph (dynamo guards on the flag, AOTAutograd traces the fake-quant) and
    switching it off reuses the first: two graphs, the eager results."""
    h = tiny()
    model = randomize(make(h)).train()
    x, y = ids(h), ids(h, seed=5)
    aot_eager, graphs = torch._dynamo.lookup_backend("aot_eager"), []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording, fullgraph=True)
    with torch.no_grad():  # the inference graphs: the retrace is the point, not the backward
        off = compiled(x, y)
        model.qat_active = True
        on = compiled(x, y)
        assert not torch.allclose(on, off) and len(graphs) == 2
        torch.testing.assert_close(on, model(x, y))
        model.qat_active = False
        torch.testing.assert_close(compiled(x, y), off)
    assert len(graphs) == 2


def test_build_model_dtypes_and_cpu_forward(tiny):
    h = tiny()
    model = tg.build_model(h)
    assert model.attention_backend == "sdpa"
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16 and dtypes.pop("bigram.embed.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}  # banks, bigram proj, vectors, 2-D control tensors
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.bigram.scale.item() == torch.tensor(0.05).bfloat16().item()  # reference: init rounded through bf16
    x = ids(h)
    logits = model.forward_logits(x)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.hidden(x).dtype == torch.float32


def test_autocast_runs_in_bf16_and_compiles(tiny):
    h = tiny()
    model = tg.build_model(h)
    x, y = ids(h), ids(h, seed=5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.hidden(x).dtype == torch.bfloat16
        loss = compiled(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, model(x, y), atol=0.05, rtol=0.05)


class _RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward kernel not built for this GPU")


def _bad_backward(q, k, v):
    return _RaisingBackward.apply(tg.sdpa_attention(q, k, v))


def _wrong_numbers(q, k, v):
    return tg.sdpa_attention(q, k, v) + 1.0


def _candidates(*fns):
    named = [tg.AttentionCandidate(f.__name__.strip("_"), lambda f=f: f) for f in fns]
    return (*named, tg.AttentionCandidate("sdpa", lambda: tg.sdpa_attention))


def test_select_attention_skips_backends_that_fail_under_compile_or_backward(capsys):
    rt = probed_runtime(_candidates(breaks_under_compile, _bad_backward, _wrong_numbers))
    assert rt.attention.name == "sdpa" and rt.attention.fn is tg.sdpa_attention
    reasons = dict(rt.attention.skipped)
    assert list(reasons) == ["breaks_under_compile", "bad_backward", "wrong_numbers"]
    assert "graph_break" in reasons["breaks_under_compile"]
    assert "backward kernel not built" in reasons["bad_backward"]
    assert "differs from SDPA" in reasons["wrong_numbers"]
    assert all("\n" not in r for r in reasons.values())
    assert tg.build_model(tg.Hyperparameters(**TINY), rt).attention_backend == "sdpa"
    tg.log_header(tg.Hyperparameters(**TINY), rt)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("attention ")]
    assert len(lines) == 1 and lines[0].startswith("attention backend:sdpa detail:breaks_under_compile skipped: ")


def test_select_attention_eager_accepts_a_backend_that_only_breaks_under_compile():
    choice = probed_runtime(_candidates(breaks_under_compile), use_compile=False).attention
    assert choice.name == "breaks_under_compile" and choice.skipped == ()


def test_select_attention_without_a_working_backend_names_the_fix():
    with pytest.raises(tg.UserError, match="COMPILE=0"):
        probed_runtime((tg.AttentionCandidate("broken", lambda: breaks_under_compile),))
    missing = (tg.AttentionCandidate("fa3", lambda: importlib.import_module("no_such_flash_module")),)
    with pytest.raises(tg.UserError, match="fa3: ModuleNotFoundError") as e:
        probed_runtime(missing, use_compile=False)
    assert "COMPILE=0" not in str(e.value)
