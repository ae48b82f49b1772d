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
