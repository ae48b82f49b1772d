"""Shared fixtures. Run the suite with: python3 -m pytest"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402


@pytest.fixture
def tg():
    return train_gpt


def tiny_hparams(**overrides):
    """A few-second CPU configuration: 2 layers, dim 64, 4 heads / 2 KV heads, vocab 128, seq 32."""
    base = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, rope_dims=8,
                xsa_last_n=1, bigram_vocab_size=64, bigram_dim=16, train_seq_len=32, eval_seq_len=32,
                eval_stride=8, eval_batch_windows=4, train_batch_tokens=256, train_micro_batch_tokens=128,
                warmup_steps=2, iterations=6, max_wallclock_seconds=0.0, val_loss_every=0, device="cpu",
                compile="0", ngram_chunk_tokens=64, run_id="test")
    base.update(overrides)
    return train_gpt.Hyperparameters(**base)


@pytest.fixture
def tiny():
    return tiny_hparams


WORDS = ("the of and to in is was for on that with as by at from his her are were it an be this which or had "
         "not but first one their also after new who they has two its time city state world year river music "
         "team school film season war house north south century county people part known game album series "
         "played including released became named located family group called number government").split()


def synthetic_documents(num_docs: int, seed: int = 0):
    """Deterministic English-like documents (word salad with some repetition) for tokenizer and shard tests."""
    import random
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sentences) + f" In {rng.randint(1800, 2020)}.")
    return docs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(data_path, tokenizer_path, vocab): a vocab-320 SentencePiece BPE + train/val shards with BOS per document."""
    import numpy as np
    import sentencepiece as spm
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_documents(1200)
    text_file = root / "text.txt"
    text_file.write_text("\n".join(docs), encoding="utf-8")
    vocab = 320
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(root / "tok"), model_type="bpe", vocab_size=vocab,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        character_coverage=0.999, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    assert sp.vocab_size() == vocab
    data = root / "tiny_sp"
    data.mkdir()
    encode = lambda ds: np.concatenate([np.array([1] + sp.encode(d), dtype=np.uint16) for d in ds])
    train_gpt.write_shard(data / "tiny_val_000000.bin", encode(docs[:150]))
    train_gpt.write_shard(data / "tiny_train_000000.bin", encode(docs[150:700]))
    train_gpt.write_shard(data / "tiny_train_000001.bin", encode(docs[700:]))
    return str(data), str(root / "tok.model"), vocab
