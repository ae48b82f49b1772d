"""Training loop pieces: the compile warm-up is undone exactly; one train step lowers the loss.
Run: python3 -m pytest tests/test_training.py"""
import copy

import torch

import train_gpt as tg


def setup(tiny, tiny_corpus, **overrides):
    data, tok, vocab = tiny_corpus
    h = tiny(data_path=data, tokenizer_path=tok, vocab_size=vocab, **overrides)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
    torch.manual_seed(0)
    model = tg.build_model(h, rt.device)
    return h, rt, model, tg.build_optimizers(model, h, rt)


def flat_state(opt_state):
    """All tensors of a (nested) optimizer state dict, in a stable order."""
    out = []
    if isinstance(opt_state, torch.Tensor):
        return [opt_state]
    if isinstance(opt_state, dict):
        for k in sorted(opt_state, key=str):
            out += flat_state(opt_state[k])
    elif isinstance(opt_state, (list, tuple)):
        for v in opt_state:
            out += flat_state(v)
    return out


def test_warmup_leaves_model_and_optimizer_bit_identical(tiny, tiny_corpus):
    h, rt, model, opt = setup(tiny, tiny_corpus, warmup_steps=3)
    loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(model, opt, loader, h, rt, 0, 1.0)  # non-empty optimizer state before the warm-up
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    tg.warmup_and_restore(model, model, opt, h, rt)
    assert model.qat_active is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    after, ref = flat_state(opt.state_dict()), flat_state(before_opt)
    assert len(after) == len(ref) and len(ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, ref))
    # and the restored optimizer continues exactly as the untouched one would
    loader_a = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(model, opt, loader_a, h, rt, 1, 1.0)
    replay_model = tg.build_model(h, rt.device)
    replay_model.load_state_dict(before_model)
    replay_opt = tg.build_optimizers(replay_model, h, rt)
    replay_opt.load_state_dict(copy.deepcopy(before_opt))
    loader_b = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    tg.train_step(replay_model, replay_opt, loader_b, h, rt, 1, 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, replay_model.state_dict()[k]), k


def test_train_steps_lower_the_loss(tiny, tiny_corpus):
    h, rt, model, opt = setup(tiny, tiny_corpus)
    loader = tg.DistributedTokenLoader(tg.find_shards(h.data_path, "train"), rt, h.vocab_size)
    losses = [float(tg.train_step(model, opt, loader, h, rt, i, 1.0)) for i in range(12)]
    assert losses[-1] < losses[0] - 0.3, losses
