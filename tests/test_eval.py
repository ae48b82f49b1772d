"""Evaluation engine: window planning, driver, totals, sliding and n-gram evals, caches, audit.

Run: python3 -m pytest tests/test_eval.py -q      (--full adds the 2-process test)
"""
import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import (CPU, ROOT, RT1, UniformLM, random_stream, random_tables, repeating_stream,
                      tiny_model, unit_tables)


class Window(typing.NamedTuple):
    """A row of a window array [n, 3]: inputs tokens[start:end], scored targets score_from..end."""
    start: int
    end: int
    score_from: int


def entropy(logp):
    """Entropy of each row of log-probabilities (nats), as the mixers compute it."""
    return -(logp.exp() * logp).sum(-1)


def ngram_eval(model, val, h, rt=RT1):
    """The n-gram score of the one plain pass."""
    return tg.roundtrip_eval(model, val, h, rt)["ngram"]


def scored_targets(w):
    return range(w.score_from, w.end + 1)


def rows(windows):
    """Window rows of an [n, 3] window array."""
    assert windows.dtype == np.int64 and windows.ndim == 2 and windows.shape[1] == 3
    return [Window(*r) for r in windows.tolist()]


# ----------------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("seq_len", [1, 2, 8, 32])
def test_plan_windows_scores_every_target_once_with_max_context(seq_len):
    for n in [1, 2, 5, 7, 31, 32, 33, 100, 257]:
        for stride in sorted({s for s in (1, 3, seq_len // 2, seq_len) if 1 <= s <= seq_len}):
            ws = rows(tg.plan_windows(n, seq_len, stride))
            got = [p for w in ws for p in scored_targets(w)]
            assert got == list(range(1, n + 1)), (n, seq_len, stride)
            assert ws[0] == Window(0, min(seq_len, n), 1)  # the first window scores all its targets
            for w in ws:
                assert 0 <= w.start < w.score_from <= w.end <= n
                assert w.end - w.start == min(seq_len, w.end)  # as long as possible
                for p in scored_targets(w):
                    assert p - w.start >= min(seq_len - stride, p)  # context tokens seen by target p


def test_split_for_rank_contiguous_balanced_cover():
    for n in [0, 1, 7, 8, 100, 101]:
        items = list(range(n))
        for world in range(1, 9):
            parts = [tg.split_for_rank(items, r, world) for r in range(world)]
            assert sum(parts, []) == items
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            arrays = [tg.split_for_rank(np.array(items), r, world) for r in range(world)]  # window arrays too
            assert [a.tolist() for a in arrays] == parts


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 50, 64, 1000])
def test_group_by_chunk_monotone_no_straddle_same_context(chunk):
    n, seq_len, stride = 300, 32, 8
    ws = tg.plan_windows(n, seq_len, stride)
    start_of = {p: w.start for w in rows(ws) for p in scored_targets(w)}
    groups = tg.group_by_chunk(ws, chunk)
    assert groups[0][0] == 1 and groups[-1][1] == n + 1
    assert len(groups) == math.ceil(n / chunk)
    seen = []
    for (c0, c1, pieces), nxt in zip(groups, groups[1:] + [(n + 1,)]):
        assert c1 == nxt[0] and c1 - c0 <= chunk and len(pieces)
        for w in rows(pieces):
            assert c0 <= w.score_from <= w.end < c1
            assert all(start_of[p] == w.start for p in scored_targets(w))
            seen += list(scored_targets(w))
    assert seen == list(range(1, n + 1))


class InputRecorder(nn.Module):
    """Uniform logits; records every batch of inputs it is given."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.inputs = vocab, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(*x.shape, self.vocab)


def recorded_batches(tiny, tokens, windows, rows, chunk=None):
    """(inputs, batch) of every batch that evaluate() builds for `windows`, `rows` windows a batch."""
    model, batches = InputRecorder(101), []

    def scorer(logp, batch):
        assert logp.shape == (len(batch.pos), 101)
        batches.append(batch)
        return torch.zeros(len(batch.pos))

    h = tiny(vocab_size=101, eval_batch_windows=rows)
    tg.evaluate(model, tg.ValData(tokens, unit_tables(101)), windows, {"s": scorer}, h, RT1, chunk)
    return list(zip(model.inputs, batches))


def test_batches_shapes_shift_and_selection(tiny):
    """evaluate()'s batches: a window's row holds tokens[start:end]; the scored entries are exactly its targets
    score_from..end, each read where its previous token is the input; shares are padded to whole batches with empty
    windows; the span is the rank's scored targets of the chunk."""
    tokens = torch.arange(101) * 7 % 101  # token at position p differs from p
    ws = np.array([[0, 10, 1], [5, 15, 12]])
    (x, b), = recorded_batches(tiny, tokens, ws, rows=4)  # one chunk, one batch: 2 windows + 2 empty ones
    assert x.shape == b.x.shape == (4, 10) and torch.equal(x, b.x)  # as long as the longest window
    assert torch.equal(x[0], tokens[:10]) and torch.equal(x[1], tokens[5:15])
    assert b.sel_pos.tolist() == list(range(1, 11)) + [12, 13, 14, 15]
    assert b.pos.tolist() == b.sel_pos.tolist()
    assert torch.equal(b.tgt, tokens[b.pos]) and torch.equal(b.prev, tokens[b.pos - 1])
    assert torch.equal(x.flatten()[b.sel], b.prev)  # the scored entry's input is the token before its target
    assert sorted(set((b.sel // 10).tolist())) == [0, 1] and b.span == (1, 16)
    chunked = recorded_batches(tiny, tokens, ws, rows=4, chunk=11)  # chunks [1, 12) and [12, 23): one window each
    assert [(tuple(x.shape), b.span, b.sel_pos.tolist()) for x, b in chunked] == [
        ((4, 10), (1, 11), list(range(1, 11))), ((4, 10), (12, 16), [12, 13, 14, 15])]
    assert [sorted(set((b.sel // 10).tolist())) for _, b in chunked] == [[0], [0]]  # rows 1..3: padding
    two = recorded_batches(tiny, tokens, np.array([[0, 10, 1], [5, 15, 12], [9, 19, 16]]), rows=2)
    assert [b.sel_pos.tolist() for _, b in two] == [list(range(1, 11)) + [12, 13, 14, 15], [16, 17, 18, 19]]


# ------------------------------------------------------------------------------------------ driver equivalences

def test_sliding_with_stride_equal_seq_len_is_plain_eval(tiny):
    vocab, seq_len, n = 64, 32, 32 * 7
    h = tiny(vocab_size=vocab, eval_seq_len=seq_len, eval_stride=seq_len, eval_batch_windows=3)
    tokens, tables, model = random_stream(n, vocab), random_tables(vocab), tiny_model(h)
    r = tg.sliding_eval(model, tg.ValData(tokens, tables), h, RT1)
    with torch.no_grad():  # independent plain evaluation
        x, y = tokens[:-1].view(-1, seq_len), tokens[1:].view(-1, seq_len)
        nll = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1), reduction="sum").double()
    nbytes = int((tables.base_bytes[y].long() + (tables.has_leading_space[y] & ~tables.is_boundary[x]).long()).sum())
    assert (r.tokens, r.bytes) == (n, nbytes)
    assert r.loss == pytest.approx(float(nll) / n, rel=1e-6)
    assert r.bpb == pytest.approx(float(nll) / math.log(2) / nbytes, rel=1e-6)


@pytest.mark.parametrize("chunk", [64, 50])
def test_ngram_with_alpha_zero_equals_sliding(tiny, chunk):
    vocab, n = 16, 1000
    h = tiny(vocab_size=vocab, ngram_mixer="seed", ngram_alpha_min=0.0, ngram_alpha_max=0.0, ngram_chunk_tokens=chunk)
    val, model = tg.ValData(random_stream(n, vocab, 1), random_tables(vocab)), tiny_model(h)
    s, g = tg.sliding_eval(model, val, h, RT1), ngram_eval(model, val, h, RT1)
    assert (g.tokens, g.bytes) == (s.tokens, s.bytes) == (n, g.bytes)
    assert g.loss == pytest.approx(s.loss, rel=1e-12) and g.bpb == pytest.approx(s.bpb, rel=1e-12)


# ------------------------------------------------------------------------------------------------ exact cache

def reference_counts(t, n, upto):
    """Dict reference: context and (context, next) counts of order n over target positions < upto."""
    ctx, pair = collections.Counter(), collections.Counter()
    for p in range(max(n - 1, 1), upto):
        c = tuple(t[p - n + 1:p])
        ctx[c] += 1
        pair[c + (t[p],)] += 1
    return ctx, pair


@pytest.mark.parametrize("vocab,alphabet", [(8, 8), (1024, 3)])
def test_exact_cache_matches_dict_reference_and_normalizes(vocab, alphabet):
    n, lo, hi, min_count = 1500, 2, 9, 2
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(vocab, generator=g)[:alphabet]
    tokens = ids[torch.randint(0, alphabet, (n + 1,), generator=g)]
    cache = tg.ExactNgramCache(vocab, min_order=lo, max_order=hi, min_count=min_count, device=CPU)
    bounds = [1, 2, 40, 41, 300, 777, 1201]
    for a, b in zip(bounds, bounds[1:]):
        cache.update(tokens, a, b)
    t = tokens.tolist()
    refs = {k: reference_counts(t, k, bounds[-1]) for k in range(lo, hi + 1)}
    pos = torch.arange(1, n + 1)
    order, p = cache.probs(tokens, pos, torch.arange(vocab).expand(n, vocab))
    matched = 0
    for q in range(1, n + 1):
        want_order, want = 0, np.zeros(vocab)
        for k in range(hi, lo - 1, -1):
            c = tuple(t[q - k + 1:q])
            if q >= k - 1 and refs[k][0][c] >= min_count:
                want_order = k
                want = np.array([refs[k][1][c + (v,)] for v in range(vocab)]) / refs[k][0][c]
                break
        assert order[q - 1].item() == want_order, q
        np.testing.assert_allclose(p[q - 1].numpy(), want, rtol=0, atol=1e-15)
        matched += want_order > 0
    assert matched > n // 2
    sums = p[order > 0].sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)
    if alphabet == 3:
        assert (order == hi).any()  # the hashed-key orders (8, 9 for a 10-bit vocab) are exercised


def test_exact_cache_grows_in_few_geometric_runs_and_stays_exact():
    """Many small chunks: the one table of all orders lives in a few sorted runs, each >= LSM_GROWTH x the next, keys
    unique across runs, and the counts still equal the dict reference, order by order."""
    vocab, n, chunk = 16, 2400, 24
    tokens = random_stream(n, vocab, 5)
    cache = tg.ExactNgramCache(vocab, min_order=2, max_order=4, min_count=1, device=CPU)
    most_runs, growth = 0, tg.LSM_GROWTH  # pinned: the sorted runs grow geometrically
    for a in range(1, n, chunk):
        cache.update(tokens, a, min(a + chunk, n + 1))
        for table in (cache.ctx, cache.pairs):
            sizes = [run[0].numel() for run in table.runs]
            assert all(big >= growth * small for big, small in zip(sizes, sizes[1:])), sizes
            keys = torch.cat([run[0] for run in table.runs])
            assert keys.unique().numel() == keys.numel()
            assert all(bool((run[0][1:] > run[0][:-1]).all()) for run in table.runs)  # each run sorted
            most_runs = max(most_runs, len(sizes))
    assert most_runs >= 3
    t, ctx_total, pair_total = tokens.tolist(), 0, 0
    for i, order in enumerate(range(2, 5)):
        ctx_ref, pair_ref = reference_counts(t, order, n + 1)
        ctx_total, pair_total = ctx_total + len(ctx_ref), pair_total + len(pair_ref)
        pos = torch.arange(order - 1, n + 1)
        found = cache.ctx.find(cache._context_keys(tokens, pos)[:, i].contiguous())
        want = [ctx_ref[tuple(t[p - order + 1:p])] for p in pos.tolist()]
        assert bool(found.hit.all()) and cache.ctx.gather(1, found).tolist() == want
    assert (cache.ctx.size, cache.pairs.size, cache.num_ids) == (ctx_total, pair_total, ctx_total)


@pytest.mark.parametrize("vocab,lo,hi", [(8, 2, 9), (1024, 2, 9), (5, 3, 5)])
def test_exact_stats_give_every_order_s_counts(vocab, lo, hi):
    """stats(): per order, the context count and the (context, candidate) count of the dict reference, for the
    target and for all V candidates; 0 where the position has no context of that order."""
    n, bounds = 900, [1, 3, 57, 400, 650]
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, min(vocab, 4), (n + 1,), generator=g) * (vocab // 4 or 1)  # few symbols: long repeats
    cache = tg.ExactNgramCache(vocab, min_order=lo, max_order=hi, min_count=2, device=CPU)
    for a, b in zip(bounds, bounds[1:]):
        cache.update(tokens, a, b)
    t = tokens.tolist()
    refs = [reference_counts(t, k, bounds[-1]) for k in range(lo, hi + 1)]
    pos = torch.arange(1, n + 1)
    st = cache.stats(tokens, pos, tokens[pos])
    full = cache.stats(tokens, pos, torch.arange(vocab).expand(n, vocab))
    assert st.ctx.shape == st.pair.shape == st.types.shape == (n, hi - lo + 1)
    assert full.pair.shape == (n, hi - lo + 1, vocab) and torch.equal(full.types, st.types)
    assert torch.equal(full.ctx, st.ctx) and torch.equal(full.pair.sum(2), st.ctx)  # exact: sum_v pair = ctx
    assert torch.equal((full.pair > 0).sum(2), st.types)  # types = distinct continuations
    types_refs = [collections.Counter(key[:-1] for key in pair_ref) for _, pair_ref in refs]
    for q in range(1, n + 1):
        for k, (ctx_ref, pair_ref) in enumerate(refs):
            c = tuple(t[q - (lo + k) + 1:q]) if q >= lo + k - 1 else None
            assert st.ctx[q - 1, k] == (ctx_ref[c] if c is not None else 0), (q, k)
            assert st.pair[q - 1, k] == (pair_ref[c + (t[q],)] if c is not None else 0), (q, k)
            assert st.types[q - 1, k] == (types_refs[k][c] if c is not None else 0), (q, k)
            if c is not None and q % 17 == 0:
                assert full.pair[q - 1, k].tolist() == [pair_ref[c + (v,)] for v in range(vocab)]
    assert (st.ctx[:, -1] > 0).sum() > n // 4  # the longest order is matched often (repeats)


def hashed_reference(t, lo, hi, min_count, buckets, upto, queries, vocab):
    """Straightforward Python version of SPEC §7.3.3-7.3.4: (order, p for every candidate) per query."""
    P = (36313, 27191, 51647, 81929, 131071, 174763, 233017, 283721, 347237, 409891, 479909, 557927, 631553, 716279,
         811207)  # the reference's primes

    def ctx_hash(p, n):
        h = 0
        for k in range(n - 1):
            h ^= t[p - (n - 1) + k] * P[k % 15]
        return h

    ctx = {n: collections.Counter() for n in range(lo, hi + 1)}
    full = {n: collections.Counter() for n in range(lo, hi + 1)}
    for n in range(lo, hi + 1):
        for p in range(max(1, n - 1), upto):
            h = ctx_hash(p, n)
            ctx[n][h & (buckets - 1)] += 1
            full[n][(h ^ (t[p] * P[(n - 1) % 15])) & (buckets - 1)] += 1
    out = []
    for q in queries:
        res = (0, [0.0] * vocab)
        for n in range(hi, lo - 1, -1):
            if q < n - 1:
                continue
            h = ctx_hash(q, n)
            cc = ctx[n][h & (buckets - 1)]
            if cc >= min_count:
                res = (n, [min(full[n][(h ^ (v * P[(n - 1) % 15])) & (buckets - 1)], cc) / max(cc, 1)
                           for v in range(vocab)])
                break
        out.append(res)
    return out


def test_hashed_cache_matches_spec_reference_loop():
    vocab, n, buckets = 40, 800, 256
    tokens = random_stream(n, vocab, 5)
    h = tg.Hyperparameters(vocab_size=vocab, ngram_mode="hashed", ngram_min_order=2, ngram_max_order=9,
                           ngram_min_count=2, ngram_buckets=buckets)
    cache = tg.make_ngram_scorer(tokens, h, RT1).cache
    cache.update(tokens, 1, 300)
    cache.update(tokens, 300, 600)
    queries = list(range(1, n + 1, 7))
    ref = hashed_reference(tokens.tolist(), 2, 9, 2, buckets, 600, queries, vocab)
    order, p = cache.probs(tokens, torch.tensor(queries), torch.arange(vocab).expand(len(queries), vocab))
    assert order.tolist() == [o for o, _ in ref]
    np.testing.assert_allclose(p.numpy(), np.array([q for _, q in ref]), rtol=0, atol=1e-15)
    assert (p.sum(1) > 1.5).any()  # collisions: not a distribution


# ------------------------------------------------------------------------------------ n-gram eval properties

def null_eval(tiny, mode):
    vocab = 1024
    h = tiny(vocab_size=vocab, eval_seq_len=64, eval_stride=64, eval_batch_windows=64, ngram_chunk_tokens=8192,
             ngram_mode=mode, ngram_buckets=4096, ngram_audit_positions=16, ngram_log_every=0)
    val = tg.ValData(random_stream(200_000, vocab, 7), unit_tables(vocab))
    return ngram_eval(UniformLM(vocab), val, h, RT1)


def test_null_uniform_stream_exact_cannot_compress_but_hashed_does(tiny):
    exact = null_eval(tiny, "exact")
    assert 10 - 0.01 <= exact.bpb <= 10 + 0.0005  # unit bytes: bpb = bits per token; the learned mixer never loses
    hashed = null_eval(tiny, "hashed")
    assert hashed.bpb < 5.0, hashed.bpb


# ------------------------------------------------------------------------------------------- the learned mixer

def plain_and_mixed(model, tokens, h):
    """(round trip, n-gram) results of one plain pass over tokens (unit byte tables)."""
    r = tg.roundtrip_eval(model, tg.ValData(tokens, unit_tables(h.vocab_size)), h, RT1)
    return r["model"], r["ngram"]


def test_learned_mixer_gains_on_repeats_never_loses_without(tiny, capsys):
    vocab = 64
    h = tiny(vocab_size=vocab, ngram_chunk_tokens=64)
    model = tiny_model(h)
    plain, mixed = plain_and_mixed(model, repeating_stream(1500, vocab, period=37, seed=3), h)
    assert mixed.bpb < plain.bpb - 1.0  # a repetitive text: the cache predicts it after one period
    assert re.search(r"^ngram_mixer mixer:learned .* model_alone:0 ", capsys.readouterr().out, re.M)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(5))
    plain, mixed = plain_and_mixed(model, perm, h)  # no repeats: no context was seen before, the model alone
    assert (mixed.loss, mixed.bpb) == (plain.loss, plain.bpb)
    for seed in (1, 2):  # random text: the counts carry no information the model lacks
        plain, mixed = plain_and_mixed(model, random_stream(3000, vocab, seed), h)
        assert mixed.bpb <= plain.bpb + 0.0005, (mixed.bpb, plain.bpb)
    seed_rule = dataclasses.replace(h, ngram_mixer="seed")
    assert plain_and_mixed(model, random_stream(3000, vocab, 2), seed_rule)[1].bpb > plain.bpb + 0.01  # it loses


def learned_reference(tokens, logp, h):
    """Straightforward Python version of the learned mixer over the chunks of h, from dict counts: -log p_final
    of every target p, given the model's log-probabilities logp[p] (a [V] row)."""
    t, orders = tokens.tolist(), range(h.ngram_min_order, h.ngram_max_order + 1)
    K, n = len(orders), len(t) - 1
    prior = np.r_[h.ngram_mixer_prior, np.full(K, (1 - h.ngram_mixer_prior) / K)]
    weights, ctx, pair, gain, out = {}, collections.Counter(), collections.Counter(), 0.0, {}
    for c0 in range(1, n + 1, h.ngram_chunk_tokens):
        c1 = min(c0 + h.ngram_chunk_tokens, n + 1)
        grad, count, chunk_gain = collections.defaultdict(lambda: np.zeros(K + 1)), collections.Counter(), 0.0
        for p in range(c0, c1):
            lp = logp[p]
            contexts = [tuple(t[p - m + 1:p]) if p >= m - 1 else None for m in orders]
            cc = np.array([ctx[c] if c is not None else 0 for c in contexts], dtype=np.float64)
            if not cc.any():
                out[p] = -float(lp[t[p]])
                continue
            top = int(np.nonzero(cc)[0].max())
            types = sum(1 for key in pair if key[:-1] == contexts[top])
            ent = float(entropy(torch.from_numpy(lp)))
            bucket = (top + 1, min(int(math.floor(math.log2(cc[top]))), 11), min(4 * types // int(cc[top]), 3),
                      min(max(int(math.floor(ent / 2)), 0), 3))
            present = np.r_[True, cc > 0]
            x = np.r_[math.exp(float(lp[t[p]])),
                      [pair[c + (t[p],)] / cc[k] if cc[k] else 0.0 for k, c in enumerate(contexts)]]
            w = weights.get(bucket, prior) * present
            p_mix = (w * x).sum() / w.sum()
            g = 1 / (1 + math.exp(-(math.log(h.ngram_mixer_guard / (1 - h.ngram_mixer_guard)) - gain)))
            out[p] = -math.log(g * x[0] + (1 - g) * p_mix)
            grad[bucket] += np.where(present, x / p_mix, 1.0)
            count[bucket] += 1
            chunk_gain += math.log(p_mix / x[0])
        for bucket, m in count.items():
            r = m / (m + h.ngram_mixer_smooth)
            w = weights.get(bucket, prior) * (1 + r * (grad[bucket] / m - 1))
            weights[bucket] = w / w.sum()
        gain += chunk_gain
        for p in range(c0, c1):
            for m in orders:
                if p >= m - 1:
                    ctx[tuple(t[p - m + 1:p])] += 1
                    pair[tuple(t[p - m + 1:p + 1])] += 1
    return out


def test_learned_mixer_matches_a_plain_python_reference(tiny):
    """Every target's NLL equals the reference's: buckets, weights, the guard and the step after each chunk."""
    vocab, n = 10, 900
    h = tiny(vocab_size=vocab, ngram_chunk_tokens=100, eval_batch_windows=3)
    g = torch.Generator().manual_seed(8)
    tokens = torch.where(torch.rand(n + 1, generator=g) < 0.3, torch.randint(0, vocab, (n + 1,), generator=g),
                         repeating_stream(n, vocab, period=23, seed=2))  # repeats with noise: every order, many buckets
    model = tiny_model(h)
    scorer = tg.make_ngram_scorer(tokens, h, RT1)
    nll_at, logp_at = {}, {}

    def recording(logp, batch):
        nll = scorer(logp, batch)
        for i, p in enumerate(batch.sel_pos.tolist()):
            nll_at[p], logp_at[p] = float(nll[i]), logp[i].numpy().copy()
        return nll

    windows = tg.plan_windows(n, h.eval_seq_len, h.eval_stride)
    tg.evaluate(model, tg.ValData(tokens, unit_tables(vocab)), windows, {"ngram": recording}, h, RT1,
                h.ngram_chunk_tokens, scorer.after_chunk)
    want = learned_reference(tokens, logp_at, h)
    assert sorted(want) == sorted(nll_at) == list(range(1, n + 1))
    np.testing.assert_allclose([nll_at[p] for p in want], list(want.values()), rtol=1e-9, atol=1e-12)
    used = scorer.mixer.seen > 0
    assert int(used.sum()) >= 20 and float(scorer.mixer.guard()) < 1e-6  # many buckets; the mixer paid
    assert (scorer.mixer.weights[used, 0] < h.ngram_mixer_prior - 0.05).any()  # and the weights moved


def recorded_ngram_run(model, tokens, h):
    """Run the n-gram driver, recording each target's NLL and checking it reads a normalized distribution."""
    val = tg.ValData(tokens, unit_tables(h.vocab_size))
    scorer = tg.make_ngram_scorer(tokens, dataclasses.replace(h, ngram_audit_positions=0), RT1)
    nll_at, dist_at = {}, {}

    def scorer_with_record(logp, batch):
        nll = scorer(logp, batch)
        pos = batch.pos
        dist = scorer.full_distribution(logp, pos)
        torch.testing.assert_close(dist.sum(1), torch.ones(len(pos), dtype=torch.float64), rtol=0, atol=1e-9)
        read = -torch.log(dist.gather(1, batch.tgt[:, None]).squeeze(1))
        torch.testing.assert_close(read, nll.double(), rtol=1e-6, atol=1e-6)
        for i, p in enumerate(batch.sel_pos.tolist()):
            assert p not in nll_at
            nll_at[p], dist_at[p] = nll[i].item(), dist[i]
        return nll

    windows = tg.plan_windows(val.num_targets, h.eval_seq_len, h.eval_stride)
    tg.evaluate(model, val, windows, {"ngram": scorer_with_record}, h, RT1, h.ngram_chunk_tokens, scorer.after_chunk)
    return nll_at, dist_at


@pytest.mark.parametrize("mixer", ["learned", "seed"])
def test_prefix_only_scores_and_target_independent_distribution(tiny, mixer):
    vocab, n = 12, 700
    h = tiny(vocab_size=vocab, ngram_chunk_tokens=64, ngram_alpha_min=0.3, ngram_mixer=mixer)
    model, tokens = tiny_model(h), random_stream(n, vocab, 9)
    base_nll, base_dist = recorded_ngram_run(model, tokens, h)
    assert sorted(base_nll) == list(range(1, n + 1))
    for t in [5, 200, 451, 699]:
        changed = tokens.clone()
        changed[t + 1:] = random_stream(n - t - 1, vocab, 100 + t)[:n - t]  # every token after t replaced
        changed[t] = (tokens[t] + 1) % vocab  # and the target at t itself
        nll, dist = recorded_ngram_run(model, changed, h)
        assert all(nll[p] == base_nll[p] for p in range(1, t))
        assert torch.equal(dist[t], base_dist[t])  # same distribution at t, only the read entry differs
        assert nll[t] != base_nll[t] or dist[t][tokens[t]] == dist[t][changed[t]]


@pytest.mark.parametrize("mode", ["exact", "hashed"])
def test_chunk_reads_equal_reading_the_tables_at_every_batch(tiny, mode):
    """The scorer reads a chunk's stats once; every batch's NLL is bit-identical to reading the tables at that batch
    (cache.probs, the seed rule's estimate) and mixing in the same way."""
    vocab, n = 12, 900
    h = tiny(vocab_size=vocab, ngram_chunk_tokens=100, ngram_alpha_min=0.3, ngram_mode=mode, ngram_buckets=64,
             eval_batch_windows=2, ngram_mixer="seed")
    tokens, model = random_stream(n, vocab, 4), tiny_model(h)
    scorer = tg.make_ngram_scorer(tokens, dataclasses.replace(h, ngram_audit_positions=0), RT1)
    checked = collections.Counter()

    def scorer_checked(logp, batch):
        nll = scorer(logp, batch)
        order, p = scorer.cache.probs(tokens, batch.pos, batch.tgt)
        alpha = scorer.mixer.alpha(entropy(logp), order)
        lp = logp.gather(1, batch.tgt[:, None]).squeeze(1).double()  # log((1 - a) p_model + a p_ngram), a > 0
        mixed = torch.logaddexp(torch.log1p(-alpha) + lp, torch.log(alpha) + torch.log(p))
        assert torch.equal(nll, -torch.where(alpha > 0, mixed, lp))
        checked[batch.span] += 1
        checked["matched"] += int((order > 0).sum())
        return nll

    windows = tg.plan_windows(n, h.eval_seq_len, h.eval_stride)
    tg.evaluate(model, tg.ValData(tokens, unit_tables(vocab)), windows, {"ngram": scorer_checked}, h, RT1,
                h.ngram_chunk_tokens, scorer.after_chunk)
    assert len(checked) == 10 and checked["matched"] > n // 2  # 9 chunks, several batches each
    assert all(c >= 2 for c in checked.values())


def test_exact_order_does_not_depend_on_target():
    vocab, t = 6, 400
    tokens = random_stream(500, vocab, 11)
    cache = tg.ExactNgramCache(vocab, min_order=2, max_order=9, min_count=2, device=CPU)
    cache.update(tokens, 1, t)
    results = []
    for v in range(vocab):
        changed = tokens.clone()
        changed[t] = v
        results.append(cache.probs(changed, torch.tensor([t]), torch.arange(vocab)[None]))
    assert all(torch.equal(o, results[0][0]) and torch.equal(p, results[0][1]) for o, p in results)
    assert results[0][0].item() > 0


def test_ngram_eval_logs_and_audit_exact(tiny, capsys):
    vocab = 16
    h = tiny(vocab_size=vocab, ngram_log_every=5, ngram_audit_positions=64)
    r = ngram_eval(tiny_model(h), tg.ValData(random_stream(1200, vocab, 2), unit_tables(vocab)), h, RT1)
    out = capsys.readouterr().out
    assert "ngram_start min_order:2 max_order:9 mode:exact chunk_tokens:64" in out
    assert re.search(r"^ngram_chunk chunk:5/19 running_bpb:\d+\.\d{6} elapsed:\d+\.\ds$", out, re.M)
    assert "ngram_chunk chunk:19/19 " in out
    m = re.search(r"^ngram_audit positions:64 sum_min:(\S+) sum_median:(\S+) sum_max:(\S+)$", out, re.M)
    assert m and all(abs(float(x) - 1) <= 1e-6 for x in m.groups())
    assert re.search(r"^ngram_eval val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$", out, re.M)
    assert f"ngram_eval_exact val_loss:{r.loss:.8f} val_bpb:{r.bpb:.8f}" in out
    assert "ngram_hashed" not in out


def test_ngram_eval_hashed_mode_uses_its_own_prefix(tiny, capsys):
    vocab = 16
    h = tiny(vocab_size=vocab, ngram_mode="hashed", ngram_buckets=256, ngram_audit_positions=32)
    ngram_eval(tiny_model(h), tg.ValData(random_stream(1200, vocab, 2), unit_tables(vocab)), h, RT1)
    out = capsys.readouterr().out
    assert re.search(r"^ngram_hashed_unnormalized val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$", out, re.M)
    assert re.search(r"^ngram_hashed_unnormalized_exact val_loss:\S+ val_bpb:\S+$", out, re.M)
    assert re.search(r"^ngram_audit positions:32 ", out, re.M)
    assert not re.search(r"^ngram_eval", out, re.M)
    assert re.search(r"^ngram_start .* mode:hashed .* mixer:seed$", out, re.M)  # the reference's whole rule
    assert re.search(r"^ngram_mixer mixer:seed score:ngram_hashed_unnormalized targets:1200 ", out, re.M)


def test_audit_moves_its_positions_in_one_copy_per_batch(tiny, monkeypatch):
    """The audit's rows and slots go to the device through host_to_device (pinned, non-blocking on CUDA), as one
    copy per batch that holds audited positions."""
    copies, real = [], tg.host_to_device  # pinned: the audit's transfers to the GPU, one copy per batch
    record = lambda t, device: copies.append(tuple(t.shape)) or real(t, device)  # noqa: E731
    monkeypatch.setattr(tg, "host_to_device", record)  # pinned: the audit's transfers to the GPU, one per batch
    vocab = 16
    h = tiny(vocab_size=vocab, ngram_audit_positions=64, ngram_log_every=0)
    ngram_eval(tiny_model(h), tg.ValData(random_stream(1200, vocab, 2), unit_tables(vocab)), h, RT1)
    assert copies and all(len(shape) == 2 and shape[0] == 2 for shape in copies)
    assert sum(shape[1] for shape in copies) == 64  # every audited position, each in exactly one copy


def test_audit_fails_an_unnormalized_exact_run(tiny, monkeypatch):
    class Inflated(tg.ExactNgramCache):
        def stats(self, tokens, pos, cand):
            st = super().stats(tokens, pos, cand)
            return st._replace(pair=st.pair * 2)

    monkeypatch.setattr(tg, "ExactNgramCache", Inflated)  # the exact mode's cache class
    vocab = 8
    h = tiny(vocab_size=vocab, ngram_audit_positions=64)
    with pytest.raises(tg.RunFailed, match="not normalized") as e:  # a failed run (exit 4), not a bug
        ngram_eval(tiny_model(h), tg.ValData(random_stream(1200, vocab, 4), unit_tables(vocab)), h, RT1)
    assert e.value.reason == "ngram_audit"


def test_roundtrip_report_lines_and_leaderboard_alias(tiny, capsys):
    """The round trip's three lines (4-digit, 8-digit exact, the leaderboard alias of the exact line) carry the
    returned result; the n-gram score adds its own two lines."""
    vocab = 16
    val = tg.ValData(random_stream(300, vocab, 2), unit_tables(vocab))
    for ngram in (False, True):
        h = tiny(vocab_size=vocab, ngram_enabled=ngram, ngram_log_every=0, ngram_audit_positions=0)
        results = tg.roundtrip_eval(tiny_model(h), val, h, RT1)
        lines = capsys.readouterr().out.splitlines()
        r = results["model"]
        assert lines[-5 if ngram else -3:][:3] == [
            f"final_int6_zstd_roundtrip val_loss:{r.loss:.4f} val_bpb:{r.bpb:.4f} eval_time:{r.time_ms:.0f}ms",
            f"final_int6_zstd_roundtrip_exact val_loss:{r.loss:.8f} val_bpb:{r.bpb:.8f}",
            f"final_int8_zlib_roundtrip_exact val_loss:{r.loss:.8f} val_bpb:{r.bpb:.8f}"]
    g = results["ngram"]
    assert lines[-2:] == [f"ngram_eval val_loss:{g.loss:.4f} val_bpb:{g.bpb:.4f} eval_time:{g.time_ms:.0f}ms",
                          f"ngram_eval_exact val_loss:{g.loss:.8f} val_bpb:{g.bpb:.8f}"]


# ------------------------------------------------------------------------------------------------ distributed

@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path):
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", DEVICE="cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "tests" / "eval_dist_worker.py"), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    one, two = results
    assert one.keys() == two.keys() == {"sliding", "roundtrip", "ngram_exact", "ngram_hashed", "ttt", "ttt_ngram"}
    for name in one:
        # TTT: gradients summed in another order, applied to bf16 weights (the embedding): an ulp apart per step
        rel = 1e-3 if name.startswith("ttt") else 1e-9
        assert (one[name]["tokens"], one[name]["bytes"]) == (two[name]["tokens"], two[name]["bytes"])
        assert one[name]["loss"] == pytest.approx(two[name]["loss"], rel=rel)
        assert one[name]["bpb"] == pytest.approx(two[name]["bpb"], rel=rel)
    assert one["roundtrip"]["loss"] == pytest.approx(one["sliding"]["loss"], rel=1e-9)
    assert one["ttt"]["loss"] < one["roundtrip"]["loss"] - 1e-4  # the adapted weights really moved
