"""Model section: parameter contract, shapes, losses, optional features, RoPE, hashing, causality, QAT, dtypes."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg


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


def test_layer_specs(tiny):
    specs = tg.layer_specs(tiny(num_layers=5, xsa_last_n=2, ln_scale=True))
    assert [s.xsa for s in specs] == [False, False, False, True, True]
    assert [round(s.norm_scale, 6) for s in specs] == [round(1 / math.sqrt(i + 1), 6) for i in range(5)]
    assert all(s.norm_scale == 1.0 for s in tg.layer_specs(tiny(num_layers=5)))


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


def test_rope_ntk_base_and_frequencies():
    assert tg.rope_base_eff(10000.0, 16, 1024, 2048) == pytest.approx(22081.79, abs=0.01)
    assert tg.rope_base_eff(10000.0, 16, 1024, 1024) == 10000.0
    rotary = tg.Rotary(tg.Hyperparameters())
    freqs = rotary.freqs(2048)
    assert freqs.shape == (8,)
    expected = torch.tensor([22081.79 ** (-2 * j / 16) for j in range(8)])
    torch.testing.assert_close(freqs, expected, rtol=1e-5, atol=0)
    assert freqs[1].item() == pytest.approx(0.2864, abs=1e-4) and freqs[7].item() == pytest.approx(1.581e-4, rel=1e-3)
    torch.testing.assert_close(rotary.freqs(512), torch.tensor([1e4 ** (-2 * j / 16) for j in range(8)]))
    assert tg.Rotary(tg.Hyperparameters(rope_dims=0)).freqs(64).shape == (32,)


def test_apply_rotary_half_split_partial():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 2, 64, generator=g)
    rope = tg.Rotary(tg.Hyperparameters())(6)
    out = tg.apply_rotary(x, rope)
    torch.testing.assert_close(out[..., 16:], x[..., 16:], rtol=0, atol=0)  # 48 dims pass through
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    ang = 1 * tg.Rotary(tg.Hyperparameters()).freqs(6)[3]  # position 1, pair (3, 3 + 8)
    x1, x2 = x[0, 1, 0, 3], x[0, 1, 0, 11]
    torch.testing.assert_close(out[0, 1, 0, 3], x1 * ang.cos() + x2 * ang.sin())
    torch.testing.assert_close(out[0, 1, 0, 11], x2 * ang.cos() - x1 * ang.sin())


def test_bigram_buckets():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1024, (3, 50), generator=g)
    b = tg.bigram_buckets(t, 1024)
    assert b.dtype == torch.int64 and b.shape == t.shape
    assert torch.all(b[:, 0] == 1023)
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
    name, fn, skipped = tg.select_attention("cpu", use_compile=False, layout=(4, 2, 8))
    assert name == "sdpa" and [n for n, _ in skipped] == ["fa3", "fa4"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, n, 8, generator=g) for n in (4, 2, 2))
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads kv head h // 2
    scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    torch.testing.assert_close(fn(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_xsa_removes_own_value_component():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    out = tg.exclude_self_value(y, v)
    own = v.repeat_interleave(2, dim=2)
    assert (out * own).sum(-1).abs().max() < 1e-5
    torch.testing.assert_close(out + (y * F.normalize(own, dim=-1)).sum(-1, keepdim=True) * F.normalize(own, dim=-1), y)


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
    expected = model.bigram.proj(tg.dequantize_rows(*tg.quantize_int6_rows(table))[tg.bigram_buckets(x, 64)])
    torch.testing.assert_close(model.bigram(x, torch.float32, model.clips), expected * model.bigram.scale)
    model.qat_active = True
    model(x, y).backward()
    assert model.qo_bank.grad.abs().sum() > 0 and table.grad.abs().sum() > 0


def test_qat_switch_retraces_under_compile(tiny):
    h = tiny()
    model = randomize(make(h)).train()
    x, y = ids(h), ids(h, seed=5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    off = compiled(x, y)
    model.qat_active = True
    on = compiled(x, y)
    assert not torch.allclose(on, off)
    torch.testing.assert_close(on, model(x, y))
    model.qat_active = False
    torch.testing.assert_close(compiled(x, y), off)


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
    compiled = torch.compile(model, backend="eager", fullgraph=True)
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


def _breaks_under_compile(q, k, v):
    torch._dynamo.graph_break()  # fine eagerly, refused by fullgraph=True
    return tg.sdpa_attention(q, k, v)


def _bad_backward(q, k, v):
    return _RaisingBackward.apply(tg.sdpa_attention(q, k, v))


def _wrong_numbers(q, k, v):
    return tg.sdpa_attention(q, k, v) + 1.0


def _candidates(*fns):
    named = [tg.AttentionCandidate(f.__name__.strip("_"), lambda f=f: f) for f in fns]
    return (*named, tg.AttentionCandidate("sdpa", lambda: tg.sdpa_attention))


def test_select_attention_skips_backends_that_fail_under_compile_or_backward():
    choice = tg.select_attention("cpu", True, (4, 2, 16), compile_backend="aot_eager",
                                 candidates=_candidates(_breaks_under_compile, _bad_backward, _wrong_numbers))
    assert choice.name == "sdpa" and choice.fn is tg.sdpa_attention
    reasons = dict(choice.skipped)
    assert list(reasons) == ["breaks_under_compile", "bad_backward", "wrong_numbers"]
    assert "graph_break" in reasons["breaks_under_compile"]
    assert "backward kernel not built" in reasons["bad_backward"]
    assert "differs from SDPA" in reasons["wrong_numbers"]
    assert all("\n" not in r for r in reasons.values())
    line = tg.log_attention(choice)
    assert line.startswith("attention backend:sdpa detail:breaks_under_compile skipped: ") and "\n" not in line


def test_select_attention_eager_accepts_a_backend_that_only_breaks_under_compile():
    choice = tg.select_attention("cpu", False, (4, 2, 16), candidates=_candidates(_breaks_under_compile))
    assert choice.name == "breaks_under_compile" and choice.skipped == ()


def test_select_attention_without_a_working_backend_names_the_fix():
    only_bad = (tg.AttentionCandidate("broken", lambda: _breaks_under_compile),)
    with pytest.raises(tg.UserError, match="COMPILE=0"):
        tg.select_attention("cpu", True, (4, 2, 16), compile_backend="aot_eager", candidates=only_bad)
    missing = (tg.AttentionCandidate("fa3", tg._flash_backend("no_such_flash_module")),)
    with pytest.raises(tg.UserError, match="fa3: ModuleNotFoundError") as e:
        tg.select_attention("cpu", False, (4, 2, 16), candidates=missing)
    assert "COMPILE=0" not in str(e.value)
