"""Optimizer section: NS5, parameter routing, single-process and 2-rank Parallel Muon, exact state restore."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import CPU, RT1, flat_params, make_batches, muon_model, tiny_hparams, tiny_model, train_steps

def svals(x):
    return torch.linalg.svdvals(x.float())


@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512), (3, 64, 96), (3, 96, 64)])
def test_ns5_singular_values_near_one(tg, shape):
    torch.manual_seed(0)
    out = tg.newton_schulz5(torch.randn(*shape))
    assert out.shape == shape and out.dtype == torch.bfloat16
    s = svals(out)
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())


def test_ns5_transpose_and_2d_handling(tg):
    torch.manual_seed(0)
    g = torch.randn(48, 80)
    assert torch.equal(tg.newton_schulz5(g.mT), tg.newton_schulz5(g).mT)  # tall input = transposed wide input
    assert torch.equal(tg.newton_schulz5(g.unsqueeze(0))[0], tg.newton_schulz5(g))  # 2-D is a batch of one
    assert torch.count_nonzero(tg.newton_schulz5(torch.zeros(2, 8, 8))) == 0  # padding matrices stay zero


def test_ns5_normalises_each_matrix_separately(tg):
    torch.manual_seed(0)
    a, b = torch.randn(64, 96), torch.randn(64, 96)
    out = tg.newton_schulz5(torch.stack([a, 64.0 * b]))
    torch.testing.assert_close(out[0], tg.newton_schulz5(a), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], tg.newton_schulz5(b), atol=1e-3, rtol=0)


BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")  # the model's parameter banks (Muon's share)


def routed_names(tg, model, h=None) -> dict:
    """Optimizer group -> names of the parameters build_optimizers gives it."""
    opt = tg.build_optimizers(model, h or tiny_hparams(), RT1)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {k: [name_of[id(p)] for g in a.param_groups for p in g["params"]] for k, a in opt.adams.items()}
    return dict(groups, muon=[name_of[id(b.param)] for b in opt.muon.banks])


def test_routing_covers_every_parameter_once(tg):
    model = muon_model()
    routes = routed_names(tg, model)
    names = [n for group in routes.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sorted(routes["muon"]) == sorted(BANKS)
    assert routes["adam_tok"] == ["tok_emb.weight", "bigram.embed.weight"]
    scalar = set(routes["adam_scalar"])
    assert {"bigram.proj.weight", "bigram.scale", "smear.gate", "skip_weights", "blocks.2.attn.attn_gate.weight",
            "blocks.0.resid_mix", "blocks.1.attn.vr_lambda"} <= scalar
    optional_off = routed_names(tg, tiny_model(tiny_hparams(bigram_vocab_size=0, smeargate_enabled=False)))
    assert optional_off["adam_tok"] == ["tok_emb.weight"]


def test_routing_rejects_unknown_parameter(tg):
    model = muon_model()
    model.head = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match=r"head\.weight"):
        tg.build_optimizers(model, tiny_hparams(), RT1)


def test_build_optimizers_groups_and_lr_scale(tg, tiny):
    h = tiny()
    opt = tg.build_optimizers(muon_model(), h, RT1)
    tok = opt.adams["adam_tok"].param_groups
    assert len(tok) == 2 and all(g["lr"] == h.tied_embed_lr for g in tok)
    assert opt.adams["adam_scalar"].param_groups[0]["lr"] == h.scalar_lr
    assert [b.name for b in opt.muon.banks] == ["mlp_up_bank", "mlp_down_bank", "qo_bank", "kv_bank"]
    opt.set_lr_scale(0.25)
    assert tok[1]["lr"] == 0.25 * h.tied_embed_lr and opt.muon.lr == 0.25 * h.matrix_lr


def test_bank_padding_and_shards_for_eight_ranks(tg):
    """The record model's banks for W = 8, on the meta device: qo/kv 22 -> 24 (3 per rank), up/down 11 -> 16 (2 per
    rank); the MLP-up update is scaled by sqrt(1536 / 512)."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    muon = tg.build_optimizers(model, tg.Hyperparameters(), tg.Runtime(5, 8, 5, CPU, True)).muon
    got = {b.name: (b.grad.shape[0], b.shard, round(b.scale, 3)) for b in muon.banks}
    assert [b.name for b in muon.banks] == ["mlp_up_bank", "mlp_down_bank", "qo_bank", "kv_bank"]
    assert got == {"qo_bank": (24, 3, 1.0), "kv_bank": (24, 3, 1.0), "mlp_up_bank": (16, 2, 1.732),
                   "mlp_down_bank": (16, 2, 1.0)}


class RecordingCollectives:
    """BankCollectives of rank 0 of 2 without a process group: reduce-scatter keeps rank 0's half of the sum of two
    equal gradients, all-gather records whether its input is dense, then fills both halves with it."""

    def __init__(self):
        self.dense = {}

    def reduce_scatter(self, out, full):
        out.copy_(2 * full[:out.shape[0]])
        return None

    def all_gather(self, full, part):
        self.dense[tuple(part.shape)] = part.is_contiguous()
        full.copy_(torch.cat((part, part)))
        return None


def test_all_gather_gets_a_dense_update_whatever_layout_ns5_returns(tg, monkeypatch):
    """NCCL's all-gather wants a dense input. On torch 2.13 NS5 happens to hand back every bank dense (the layout of
    a·X carries its transpose back), so .contiguous() costs no copy there; the test gives it a strided result."""
    real = tg.newton_schulz5
    assert all(real(torch.randn(*shape)).is_contiguous() for shape in ((3, 96, 32), (3, 32, 96)))
    monkeypatch.setattr(tg, "newton_schulz5", lambda g, steps: real(g, steps).mT.contiguous().mT)  # same values
    model = muon_model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    muon = tg.build_optimizers(model, tiny_hparams(), tg.Runtime(0, 2, 0, CPU, True)).muon
    muon.comm = RecordingCollectives()
    muon.launch()
    muon.finish()
    assert muon.comm.dense == {(2, 96, 32): True, (2, 32, 96): True, (3, 32, 32): True, (3, 16, 32): True}


def naive_ns5(m, steps=5):
    """One matrix at a time, written out plainly."""
    x = m.bfloat16()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * (a @ a)) @ x
    return x.T if tall else x


def naive_reference_steps(tg, model, h, batches, mus=(0.9, 0.95), scales=(1.0, 0.5)):
    """Plain AdamW on explicit groups + a per-matrix Muon loop with its own bf16 momentum."""
    named = dict(model.named_parameters())
    banks = [named[n] for n in BANKS]
    embeds = ("tok_emb.weight", "bigram.embed.weight")
    scalar = [p for n, p in named.items() if n not in BANKS + embeds]
    kw = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd)
    adams = [torch.optim.AdamW([{"params": [named[n]], "lr": h.tied_embed_lr} for n in embeds], **kw),
             torch.optim.AdamW(scalar, lr=h.scalar_lr, **kw)]
    bases = [[g["lr"] for g in a.param_groups] for a in adams]
    moms = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in banks]
    for (x, y), mu, s in zip(batches, mus, scales):
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        for a, base in zip(adams, bases):
            for g, lr in zip(a.param_groups, base):
                g["lr"] = lr * s
            a.step()
        lr = h.matrix_lr * s
        with torch.no_grad():
            for p, m in zip(banks, moms):
                g = p.grad.bfloat16()
                m.mul_(mu).add_(g)
                u = torch.add(g, m, alpha=mu)  # g + mu*m rounded once to bf16, as the reference's g.add(buf, alpha=mu)
                p.mul_(1 - lr * h.muon_wd)
                for i in range(p.shape[0]):
                    scale = max(1.0, p.shape[1] / p.shape[2]) ** 0.5
                    p[i].add_(naive_ns5(u[i]).float(), alpha=-lr * scale)


def test_single_process_step_matches_naive_reference(tg, tiny):
    h = tiny(grad_clip_norm=0.0)
    torch.manual_seed(0)
    model = muon_model()
    ref = copy.deepcopy(model)
    batches = make_batches()
    train_steps(model, tg.build_optimizers(model, h, RT1), batches)
    naive_reference_steps(tg, ref, h, batches)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_state_dict_restores_bit_identical_behaviour(tg, tiny):
    h = tiny()
    torch.manual_seed(0)
    model = muon_model()
    opt = tg.build_optimizers(model, h, RT1)
    batches = make_batches(steps=3, seed=2)
    train_steps(model, opt, batches[:1])
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
    train_steps(model, opt, batches[1:], mus=(0.93, 0.97), scales=(0.7, 0.3))
    first = flat_params(model)
    model.load_state_dict(snap_model)
    opt.load_state_dict(snap_opt)
    train_steps(model, opt, batches[1:], mus=(0.93, 0.97), scales=(0.7, 0.3))
    assert torch.equal(flat_params(model), first)
    model.load_state_dict(snap_model)  # the snapshot itself is not aliased by the optimizers
    opt.load_state_dict(snap_opt)
    train_steps(model, opt, batches[1:], mus=(0.93, 0.97), scales=(0.7, 0.3))
    assert torch.equal(flat_params(model), first)


class FixedBatches:
    """A loader that hands train_step the same micro-batches in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self, tokens, seq_len):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def prefetch(self, tokens, seq_len):
        pass


def grads_after_train_step(tg, clip: float) -> dict:
    """train_step's gradients (kept until the next zero_grad) with GRAD_CLIP_NORM=clip: 2 micro-steps of 4 x 16."""
    h = tiny_hparams(num_layers=3, model_dim=32, vocab_size=64, bigram_vocab_size=32, bigram_dim=8,
                     train_seq_len=16, train_batch_tokens=128, train_micro_batch_tokens=64, grad_clip_norm=clip)
    model = muon_model()
    tg.train_step(model, tg.build_optimizers(model, h, RT1), FixedBatches(make_batches(2, 4, 16)), h, RT1, 0, 1.0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_step_clips_the_gradient_norm_and_zero_disables_it(tg):
    raw = grads_after_train_step(tg, 0.0)
    model = muon_model()  # the same weights: the unclipped gradient of the same two micro-batches
    for x, y in make_batches(2, 4, 16):
        (model(x, y) / 2).backward()
    assert raw.keys() == {n for n, p in model.named_parameters() if p.grad is not None}  # block 0's vr_lambda: none
    assert all(torch.equal(raw[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    clipped = grads_after_train_step(tg, 1e-3)
    total = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in clipped.values()]))
    assert total == pytest.approx(1e-3, rel=0.02)
    ratio = 1e-3 / torch.linalg.vector_norm(torch.stack([g.float().norm() for g in raw.values()]))
    for n, g in clipped.items():  # one factor for the whole model, not per tensor
        torch.testing.assert_close(g.float(), raw[n].float() * ratio, rtol=0.02, atol=1e-9)


@pytest.mark.slow
def test_two_rank_parallel_muon_matches_single_process(tmp_path):
    out = tmp_path / "dist.json"
    worker = Path(__file__).with_name("optim_dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    assert report["used_fallback"] == {"native": False, "fallback": True}  # the refused reduce-scatter switched it
    assert report["rank_max_abs_diff"] == 0.0  # every rank ends with identical weights
    assert report["fallback_max_abs_diff"] == 0.0  # all-reduce+slice fallback = native reduce-scatter
    # The bound on the embeddings (bf16 parameters, bf16 gradients). Two ranks sum two bf16 half-gradients in bf16
    # and halve; one process rounds the whole gradient once: the gradients differ by a few bf16 roundings, not by
    # fp32 reduction noise. That reaches the weights in two ways. (a) Rounding: AdamW rounds each bf16 element twice
    # per step (decay, update); gradients a rounding apart can land on either side of a rounding midpoint, so after
    # N steps an element may differ by 2N ulps of its magnitude (one ulp of a weight near 4 is 2^-5, most of one
    # step's move of 0.035: why a max-relative limit had to be loose). (b) A flip: an element whose gradient lies
    # within rounding of zero gets AdamW's sign-like early steps (|m/sqrt(v)| <= 1.0004) in the other direction, at
    # most 2 x 1.0004 x the summed LRs in all. So every element must obey (a) + (b) exactly, and (a) alone must hold
    # for all but 1% of the elements (measured: 0.1% of tok_emb, none of the bigram table); a rank that used other
    # rows, scales or batches moves nearly every element off the rounding bound.
    assert set(report["bf16"]) == {"tok_emb.weight", "bigram.embed.weight"}
    for name, r in report["bf16"].items():
        assert r["excess_over_flip_bound"] <= 0 and r["share_beyond_rounding"] <= 0.01, (name, r)
    for name, rel in report["rel_diff_vs_single"].items():
        if name not in report["bf16"]:
            assert rel < 0.15, (name, rel)  # fp32 weights; the banks' Muon update is bf16 (momentum, NS5)
    for name, rel in report["state_rel_diff_vs_single"].items():  # averaged (not summed) grads feed the state
        assert rel < 0.3, (name, rel)  # a sum instead of a mean over 2 ranks gives >= 1
