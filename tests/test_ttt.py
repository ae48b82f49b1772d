"""Legal score-first TTT (TTT_ENABLED=1) and the one-pass engine's compiled path.

Run: python3 -m pytest tests/test_ttt.py -q      (the 1-rank = 2-rank TTT check is in test_eval.py, marked slow)
"""
import dataclasses
import math
import re

import pytest
import torch

import train_gpt as tg
from conftest import RT1, random_stream, random_tables, repeating_stream, tiny_model, unit_tables


EVALUATE = tg.evaluate


def ttt_hparams(tiny, **overrides):
    base = dict(vocab_size=16, eval_seq_len=32, eval_stride=8, eval_batch_windows=4, ngram_chunk_tokens=128,
                ngram_audit_positions=48, ngram_log_every=0, ttt_enabled=True, ttt_chunk_tokens=128, ttt_batch_seqs=3,
                ttt_epochs=2, ttt_lr=0.05, ttt_log_every=0)
    base.update(overrides)
    return tiny(**base)


def recorded_passes(monkeypatch, model, tokens, h):
    """(per-target NLL of the TTT pass for 'model' and 'ngram', results) with every score recorded by position: the
    pass's own scorers, as ttt_eval hands them to evaluate, each wrapped by a recorder."""
    seen = {"model": {}, "ngram": {}}

    def recording(name, scorer):
        def score(logp, batch):
            nll = scorer(logp, batch)
            for p, v in zip(batch.sel_pos.tolist(), nll.tolist()):
                assert p not in seen[name]
                seen[name][p] = v
            return nll
        return score

    def evaluate(model, val, windows, scorers, *args, **kwargs):
        return EVALUATE(model, val, windows, {n: recording(n, s) for n, s in scorers.items()}, *args, **kwargs)
    monkeypatch.setattr(tg, "evaluate", evaluate)
    results = tg.ttt_eval(model, tg.ValData(tokens, unit_tables(h.vocab_size)), h, RT1)
    return seen, results


def test_ttt_scores_chunk_k_before_training_on_it(tiny, monkeypatch):
    h = ttt_hparams(tiny)
    n, c = 700, h.ttt_chunk_tokens
    tokens = random_stream(n, h.vocab_size, 3)
    base, _ = recorded_passes(monkeypatch, tiny_model(h), tokens, h)
    assert sorted(base["model"]) == sorted(base["ngram"]) == list(range(1, n + 1))
    for k in (0, 2, 4):
        changed = tokens.clone()
        first = 1 + (k + 1) * c  # first target of chunk k+1
        changed[first:] = random_stream(n - first, h.vocab_size, 50 + k)
        got, _ = recorded_passes(monkeypatch, tiny_model(h), changed, h)
        for name in ("model", "ngram"):
            assert all(got[name][p] == base[name][p] for p in range(1, first)), (name, k)
            assert any(got[name][p] != base[name][p] for p in range(first, n + 1)), (name, k)


def test_ttt_with_zero_lr_equals_the_plain_pass(tiny):
    h = ttt_hparams(tiny, ttt_lr=0.0)
    val = tg.ValData(random_stream(900, h.vocab_size, 4), random_tables(h.vocab_size))
    model = tiny_model(h)
    plain, ttt = tg.roundtrip_eval(model, val, h, RT1), tg.ttt_eval(model, val, h, RT1)
    for name in ("model", "ngram"):
        assert ttt[name][:4] == plain[name][:4], name  # loss, bpb, tokens, bytes: bit-identical


def test_a_step_takes_at_most_a_chunks_whole_sequences_and_the_log_says_so(tiny, capsys):
    h = ttt_hparams(tiny, ttt_batch_seqs=32)  # a chunk of 128 targets holds 4 whole sequences of 32
    tg.ttt_eval(tiny_model(h), tg.ValData(random_stream(300, h.vocab_size, 4), random_tables(h.vocab_size)), h, RT1)
    assert re.search(r"^ttt_start .* batch_seqs:32 seqs_per_step:4 ", capsys.readouterr().out, re.M)


def test_ttt_leaves_the_artifact_weights_alone_and_adapts_a_copy(tiny, capsys):
    h = ttt_hparams(tiny, ngram_audit_positions=64)
    val = tg.ValData(repeating_stream(900, h.vocab_size, seed=5), random_tables(h.vocab_size))
    model = tiny_model(h)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = tg.roundtrip_eval(model, val, h, RT1)
    ttt = tg.ttt_eval(model, val, h, RT1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ttt["model"].loss < plain["model"].loss - 1e-3 and ttt["ngram"].loss != plain["ngram"].loss
    assert tg.roundtrip_eval(model, val, h, RT1)["model"][:4] == plain["model"][:4]  # and scores the same
    out = capsys.readouterr().out
    audits = re.findall(r"^ngram_audit positions:64 sum_min:(\S+) sum_median:(\S+) sum_max:(\S+)$", out, re.M)
    assert len(audits) == 3 and all(abs(float(x) - 1) <= 1e-6 for a in audits for x in a)  # plain, TTT, plain again
    assert re.search(r"^ttt_start chunks:8 chunk_tokens:128 lr:0.05 epochs:2 batch_seqs:3 seqs_per_step:3 ", out, re.M)
    for name in ("legal_ttt", "ttt_ngram_eval"):
        assert re.search(rf"^{name} val_loss:\d+\.\d{{4}} val_bpb:\d+\.\d{{4}} eval_time:\d+ms$", out, re.M)
        assert re.search(rf"^{name}_exact val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}}$", out, re.M)


def test_ttt_lr_follows_a_cosine_over_the_chunks(tiny):
    """Chunk k of K trains at TTT_LR * (1 + cos(pi k / (K - 1))) / 2; the last chunk is scored, never trained on."""
    h = ttt_hparams(tiny, ttt_lr=0.002, ttt_epochs=1, ttt_chunk_tokens=64, ngram_enabled=False)
    model = tiny_model(h)
    trainer = tg.ScoreFirstTTT(model, model, random_stream(5 * 64, h.vocab_size, 2), h, RT1)
    assert trainer.num_chunks == 5
    lrs = []
    for k in range(5):
        before = {n: p.clone() for n, p in model.state_dict().items()}
        trainer.after_chunk(1 + 64 * k, 1 + 64 * (k + 1))
        lrs.append(trainer.opt.param_groups[0]["lr"])
        trained = any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
        assert trained == (k < 4), k
    assert lrs[:4] == pytest.approx([0.002, 0.001 * (1 + math.cos(math.pi / 4)), 0.001, 0.001 * (1 - math.cos(math.pi / 4))])


def test_ttt_batch_shape_is_fixed_and_reads_only_scored_tokens(tiny):
    """Every TTT step has the same input shape (one compiled graph) and never reads a token at or after `end`."""
    h = ttt_hparams(tiny, ttt_batch_seqs=3, ttt_chunk_tokens=160, eval_seq_len=32)
    shapes, reads, firsts, lows = [], [], [], []

    def spy(module, args, kwargs):
        x, targets = args[0], args[1] if len(args) > 1 else kwargs.get("targets")
        if targets is not None:
            shapes.append(tuple(x.shape))
            reads.append(int(torch.cat([x, targets], 1).max()))
            lows.append(int(x.min()))
            firsts.extend(x[:, 0].tolist())

    positions = torch.arange(701)  # token value = its position: what a step reads shows where it read
    h = dataclasses.replace(h, vocab_size=701)
    model = tiny_model(h)
    model.register_forward_pre_hook(spy, with_kwargs=True)
    trainer = tg.ScoreFirstTTT(model, model, positions, h, RT1)
    for start, end in [(1, 161), (161, 321), (321, 481)]:
        before = len(reads)
        trainer.after_chunk(start, end)
        assert len(reads) - before == h.ttt_epochs * 2  # 5 sequences in steps of 3: 2 steps per epoch
        assert max(reads[before:]) <= end - 1 and min(lows[before:]) >= start - 1  # targets of this chunk only
        whole = {start - 1 + i * h.eval_seq_len for i in range((end - start) // h.eval_seq_len)}
        assert whole <= set(firsts[before * 3:])  # every whole sequence of the chunk's targets is trained on
    assert set(shapes) == {(3, 32)}


def test_freeze_blocks_keeps_their_bank_rows(tiny):
    h = tiny(vocab_size=64, eval_seq_len=32, eval_stride=16, eval_batch_windows=4, ngram_enabled=False,
             ttt_enabled=True, ttt_chunk_tokens=64, ttt_batch_seqs=2, ttt_epochs=1, ttt_lr=0.05, ttt_freeze_blocks=1,
             ttt_log_every=0)
    model = tg.build_model(h)
    trainer = tg.ScoreFirstTTT(model, model, random_stream(400, 64, 7), h, RT1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.after_chunk(1, 65)
    trainer.after_chunk(65, 129)
    after, n = model.state_dict(), h.num_layers
    for bank, frozen in (("qo_bank", [0, n]), ("kv_bank", [0, n]), ("mlp_up_bank", [0]), ("mlp_down_bank", [0])):
        assert all(torch.equal(after[bank][i], before[bank][i]) for i in frozen), bank
    assert not torch.equal(after["qo_bank"][1], before["qo_bank"][1])  # block 1 trains
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("blocks.0."))
    trainable, frozen = trainer.counts()
    assert frozen > 0 and trainable + frozen == sum(p.numel() for p in model.parameters())


def test_ttt_enabled_is_a_setting_and_ttt_settings_are_checked(tiny):
    h = tg.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_LR": "0.001", "TTT_EPOCHS": "2", "RUN_ID": "x"})
    assert h.ttt_enabled and h.ttt_lr == 0.001 and h.ttt_epochs == 2
    # (the defaults are the README's record configuration: tests/test_config.py reads them from its settings table)
    with pytest.raises(ValueError, match="TTT_CHUNK_TOKENS=100 must be >= EVAL_SEQ_LEN=2048"):
        tg.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "100"})
    with pytest.raises(ValueError, match="TTT_FREEZE_BLOCKS=12"):
        tg.Hyperparameters.from_env({"TTT_FREEZE_BLOCKS": "12"})
    with pytest.raises(ValueError, match="TTT_MOMENTUM"):
        tg.Hyperparameters.from_env({"TTT_MOMENTUM": "1.0"})
