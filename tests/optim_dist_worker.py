"""A torchrun worker for Parallel Muon, on a stand-in model that follows the optimizer naming contract.

Run by tests/test_optim.py as
    python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/optim_dist_worker.py OUT.json
Every rank starts from the same weights and takes its half of each global batch; rank 0 also runs the
single-process optimizer on the whole batch and writes the comparison to OUT.json. Importing does nothing.
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from conftest import flat_params, make_batches, rel_diffs, train_steps  # noqa: E402

STEP_SCALES = (1.0, 0.5)  # the LR multiplier of each step


class StandInBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.attn = nn.Module()
        self.attn.q_gain = nn.Parameter(torch.full((heads,), 1.5))
        self.attn.attn_gate = nn.Linear(d, heads)
        self.attn.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5]))


class StandIn(nn.Module):
    """Every parameter name of the contract; a toy forward that gives each one a well-conditioned gradient.

    Kept instead of the real GPT (tests/conftest.py muon_model): the 2-rank comparison needs every parameter to move
    by a clear margin in 2 steps. At init the real model has near-zero gradients (zero bigram table, block 0's unused
    vr_lambda, scales at 1), where AdamW's first step is ~lr·sign(g) and a sum in another order flips the sign:
    measured relative differences up to 1.8 (bigram.proj, mlp/attn scales) against 0.09 for the banks."""

    def __init__(self, L=3, d=32, kv=16, hid=96, vocab=64, heads=4, bigram_vocab=32, bigram_dim=8, extras=True):
        super().__init__()
        self.L, self.heads, self.bigram_vocab, self.extras = L, heads, bigram_vocab, extras
        self.tok_emb = nn.Embedding(vocab, d).to(torch.bfloat16)
        if extras:
            self.bigram = nn.Module()
            self.bigram.embed = nn.Embedding(bigram_vocab, bigram_dim).to(torch.bfloat16)
            self.bigram.proj = nn.Linear(bigram_dim, d, bias=False)
            self.bigram.scale = nn.Parameter(torch.tensor(0.05))
            self.smear = nn.Module()
            self.smear.gate = nn.Parameter(torch.zeros(d))
        self.skip_weights = nn.Parameter(torch.ones(1, d))
        self.blocks = nn.ModuleList(StandInBlock(d, heads) for _ in range(L))
        self.qo_bank = nn.Parameter(torch.randn(2 * L, d, d) / d**0.5)
        self.kv_bank = nn.Parameter(torch.randn(2 * L, kv, d) / d**0.5)
        self.mlp_up_bank = nn.Parameter(torch.randn(L, hid, d) / d**0.5)
        self.mlp_down_bank = nn.Parameter(torch.randn(L, d, hid) / hid**0.5)

    def embed(self, x):
        h = self.tok_emb(x).float()
        if self.extras:
            prev = torch.cat([x[:, :1], x[:, :-1]], 1)
            h = h + self.bigram.scale * self.bigram.proj(self.bigram.embed((7 * x + prev) % self.bigram_vocab).float())
            g = torch.sigmoid(self.smear.gate)
            h = (1 - g) * h + g * torch.cat([h[:, :1], h[:, :-1]], 1)
        return h

    def forward(self, x, y):
        h0 = h = self.embed(x)
        d = h.shape[-1]
        for i, blk in enumerate(self.blocks):
            h = blk.resid_mix[0] * h + blk.resid_mix[1] * h0
            q = F.linear(h, self.qo_bank[i]) * blk.attn.q_gain.repeat_interleave(d // self.heads)
            k, v = F.linear(h, self.kv_bank[i]), F.linear(h, self.kv_bank[self.L + i])
            gate = torch.sigmoid(blk.attn.attn_gate(h)).repeat_interleave(d // self.heads, -1)
            mix = torch.cat([blk.attn.vr_lambda[0] * v * torch.tanh(k), blk.attn.vr_lambda[1] * v], -1)
            h = h + blk.attn_scale * F.linear(torch.tanh(q) * mix * gate, self.qo_bank[self.L + i])
            h = h + blk.mlp_scale * F.linear(F.relu(F.linear(h, self.mlp_up_bank[i])).square(), self.mlp_down_bank[i])
        h = F.rms_norm(h + self.skip_weights * h0, (d,))
        logits = F.linear(h, self.tok_emb.weight.float())
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def state_rel_diffs(dist_opt, single_opt) -> dict:
    """Rank 0's optimizer state against the single-process one: AdamW moments, Muon momentum rows of its shard."""
    out = {}
    for k, opt in dist_opt.adams.items():
        ref_state = single_opt.adams[k].state_dict()["state"]
        for i, st in opt.state_dict()["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                ref = ref_state[i][key].float()
                out[f"{k}.{i}.{key}"] = (st[key].float() - ref).abs().max().item() / ref.abs().max().item()
    for b, ref in zip(dist_opt.muon.banks, single_opt.muon.banks):
        want = ref.momentum[:b.shard].float()
        out[f"muon.{b.name}"] = (b.momentum.float() - want).abs().max().item() / want.abs().max().item()
    return out


def bf16_report(a, b, init, steps: int, lr_sum: float) -> dict:
    """How far the bf16 parameter a lies from b, against the two bounds of tests/test_optim.py: two bf16 roundings
    per step (weight decay, update), each of one ulp at the element's largest magnitude (8 significant bits); and
    a flip of AdamW's sign-like early steps (|m/sqrt(v)| <= 1.0004 for betas 0.9/0.95) over the summed LRs."""
    a, b, init = a.detach().float(), b.detach().float(), init.float()
    top = torch.maximum(torch.maximum(a.abs(), b.abs()), init.abs()).clamp(min=2.0**-126)
    rounding = 2 * steps * torch.exp2(torch.floor(torch.log2(top)) - 7)
    diff = (a - b).abs()
    return {"share_beyond_rounding": (diff > rounding).float().mean().item(),
            "excess_over_flip_bound": (diff - rounding - 2 * 1.0004 * lr_sum).max().item()}


def refused(*args, **kwargs):
    raise RuntimeError("reduce_scatter is not supported by this gloo build")  # what such a build raises at launch


def train_on_my_half(init_model, h, rt, mine, gloo_without_reduce_scatter: bool):
    """The model and optimizers after the steps; a gloo build without reduce-scatter is simulated by refusing both
    of its names, so the optimizer's own switch to all-reduce + slice is what runs."""
    real = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")}
    try:
        if gloo_without_reduce_scatter:
            for name in real:
                setattr(dist, name, refused)
        model = copy.deepcopy(init_model)
        opt = tg.build_optimizers(model, h, rt)
        train_steps(model, opt, mine, scales=STEP_SCALES)
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return model, opt


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    h = tg.Hyperparameters(grad_clip_norm=0.0)
    torch.manual_seed(0)
    init_model = StandIn()
    init = {n: p.detach().clone() for n, p in init_model.named_parameters()}
    batches = make_batches()
    per = batches[0][0].shape[0] // world
    mine = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in batches]
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"), True)
    results = {}
    for mode in ("native", "fallback"):
        results[mode], results[mode + "_opt"] = train_on_my_half(init_model, h, rt, mine, mode == "fallback")
    gathered = [torch.empty_like(flat_params(results["native"])) for _ in range(world)]
    dist.all_gather(gathered, flat_params(results["native"]))
    if rank == 0:
        ref = copy.deepcopy(init_model)
        ref_opt = tg.build_optimizers(ref, h, tg.single_process_runtime())
        train_steps(ref, ref_opt, batches, scales=STEP_SCALES)
        report = {
            "world": world,
            "used_fallback": {mode: results[mode + "_opt"].muon.comm.use_fallback for mode in ("native", "fallback")},
            "rank_max_abs_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
            "fallback_max_abs_diff": (flat_params(results["fallback"]) - flat_params(results["native"])).abs().max().item(),
            "rel_diff_vs_single": rel_diffs(results["native"], ref, init),
            "state_rel_diff_vs_single": state_rel_diffs(results["native_opt"], ref_opt),
            "bf16": {n: bf16_report(p, ref_p, init[n], len(batches), h.tied_embed_lr * sum(STEP_SCALES))
                     for (n, p), ref_p in zip(results["native"].named_parameters(), ref.parameters())
                     if p.dtype == torch.bfloat16},
        }
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    tg.shutdown(0)  # the script's own end: barrier, leave the group, skip gloo's C++ teardown


if __name__ == "__main__":
    main()
