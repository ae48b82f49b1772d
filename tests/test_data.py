"""Shard format, shard discovery, the distributed training loader and the validation loader.

Run: python3 -m pytest tests/test_data.py
"""
import os

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import FakeCudaTransfers


def write_raw(path, header_words, payload: bytes = b""):
    """A file with an arbitrary int32 header (padded to 256 words unless it is deliberately short) and payload."""
    header = np.asarray(header_words, dtype="<i4")
    path.write_bytes(header.tobytes() + payload)
    return path


# The shard format (upstream's FineWeb shards, a compatibility contract): 256 little-endian int32 header words (magic
# 20240520, version 1, token count, zeros), then the tokens as little-endian uint16.
HEADER_WORDS, MAGIC, VERSION = 256, 20240520, 1


def full_header(magic=MAGIC, version=VERSION, count=0):
    h = np.zeros(HEADER_WORDS, dtype="<i4")
    h[:3] = (magic, version, count)
    return h


def write_position_shards(folder, name, split, lengths, offset=0):
    """Shards whose tokens are their global stream positions (offset + 0, 1, 2, ...)."""
    paths, pos = [], offset
    for i, n in enumerate(lengths):
        path = folder / f"{name}_{split}_{i:06d}.bin"
        tg.write_shard(path, np.arange(pos, pos + n, dtype=np.uint16))
        paths.append(str(path))
        pos += n
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Shard format
# ----------------------------------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, size=12_345, dtype=np.int64)
    path = tmp_path / "x_train_000000.bin"
    tg.write_shard(path, tokens)
    out = tg.read_shard(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, tokens.astype(np.uint16))
    assert path.stat().st_size == 4 * HEADER_WORDS + 2 * tokens.size


def test_round_trip_empty_shard_and_header_layout(tmp_path):
    path = tmp_path / "e_val_000000.bin"
    tg.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert tg.read_shard(path).size == 0
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    assert list(header[:3]) == [MAGIC, VERSION, 0] and not header[3:].any() and path.stat().st_size == 4 * HEADER_WORDS


def test_write_shard_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(tg.UserError):
        tg.write_shard(tmp_path / "bad.bin", np.array([0, 65536]))
    with pytest.raises(tg.UserError):
        tg.write_shard(tmp_path / "bad.bin", np.array([-1, 2]))
    assert not (tmp_path / "bad.bin").exists()


@pytest.mark.parametrize("case", ["bad_magic", "bad_version", "truncated_header", "truncated_file",
                                  "extra_bytes", "token_too_large", "missing"])
def test_read_shard_rejections_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}_train_000000.bin"
    payload = np.arange(10, dtype="<u2").tobytes()
    if case == "bad_magic":
        write_raw(path, full_header(magic=1234, count=10), payload)
    elif case == "bad_version":
        write_raw(path, full_header(version=2, count=10), payload)
    elif case == "truncated_header":
        write_raw(path, full_header(count=0)[:100])
    elif case == "truncated_file":
        write_raw(path, full_header(count=10), payload[:-2])
    elif case == "extra_bytes":
        write_raw(path, full_header(count=10), payload + b"\x00\x00")
    elif case == "token_too_large":
        write_raw(path, full_header(count=10), payload)
    expected = {"bad_magic": "bad magic", "bad_version": "version", "truncated_header": "truncated header",
                "truncated_file": "truncated file", "extra_bytes": "size mismatch", "token_too_large": "vocab size",
                "missing": "cannot open"}[case]
    with pytest.raises(tg.UserError, match=expected) as err:
        tg.read_shard(path, vocab_size=8 if case == "token_too_large" else None)
    assert str(path) in str(err.value)


def test_read_shard_vocab_check_accepts_ids_below_vocab(tmp_path):
    path = tmp_path / "ok.bin"
    tg.write_shard(path, np.arange(8))
    assert tg.read_shard(path, vocab_size=8).size == 8


# ----------------------------------------------------------------------------------------------------------------
# Shard discovery
# ----------------------------------------------------------------------------------------------------------------


def test_find_shards_official_and_local_names_sorted(tmp_path):
    for name in ["fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin",
                 "sample_train_000000.bin", "notes.txt"]:
        tg.write_shard(tmp_path / name, np.arange(3)) if name.endswith(".bin") else (tmp_path / name).write_text("x")
    train = [os.path.basename(p) for p in tg.find_shards(str(tmp_path), "train")]
    assert train == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "sample_train_000000.bin"]
    assert [os.path.basename(p) for p in tg.find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]


def test_find_shards_none_gives_make_data_hint(tmp_path):
    with pytest.raises(tg.UserError) as err:
        tg.find_shards(str(tmp_path), "val")
    msg = str(err.value)
    assert "cached_challenge_fineweb.py" in msg and "make_dataset.py --input sample" in msg and str(tmp_path) in msg


def test_data_path_is_a_literal_folder_never_a_pattern(tmp_path):
    (tmp_path / "ds1").mkdir()
    write_position_shards(tmp_path / "ds1", "sib", "train", [3])
    literal = tmp_path / "ds[1]"  # as a glob pattern, this names the sibling ds1
    with pytest.raises(tg.UserError, match=r"no train shards match .*ds\[1\]"):
        tg.find_shards(str(literal), "train")
    literal.mkdir()
    mine = write_position_shards(literal, "mine", "train", [4])
    assert tg.find_shards(str(literal), "train") == mine  # its own shards, not the sibling's


def test_find_shards_ignores_hidden_and_temporary_files(tmp_path):
    files = write_position_shards(tmp_path, "x", "val", [3])
    tg.write_shard(tmp_path / ".x_val_000001.bin", np.arange(3))
    assert tg.find_shards(str(tmp_path), "val") == files


# ----------------------------------------------------------------------------------------------------------------
# Training loader
# ----------------------------------------------------------------------------------------------------------------


def make_runtime(rank, world):
    return tg.Runtime(rank, world, 0, torch.device("cpu"), world > 1)


def stream_of(loader, batches: int, local: int) -> np.ndarray:
    """The stream positions a one-rank loader hands out in `batches` batches of `local` inputs (local + 1 tokens
    each: the inputs and the last target)."""
    out = []
    for _ in range(batches):
        x, y = loader.next_batch(local, local)
        out += [x.flatten().numpy(), y.flatten()[-1:].numpy()]
    return np.concatenate(out)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_spans_disjoint_and_cover_global_batch(tmp_path, world):
    files = write_position_shards(tmp_path, "pos", "train", [1000, 1000, 1000])
    local, seq_len, steps = 24, 8, 3
    loaders = [tg.DistributedTokenLoader(files, make_runtime(r, world)) for r in range(world)]
    span = local + 1
    for step in range(steps):
        seen = []
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(local, seq_len)
            assert x.shape == y.shape == (local // seq_len, seq_len) and x.dtype == torch.int64
            torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1])  # targets = inputs shifted by one
            start = step * world * span + r * span
            torch.testing.assert_close(x.flatten(), torch.arange(start, start + local))
            assert int(y.flatten()[-1]) == start + local
            seen.extend(range(start, start + span))
        base = step * world * span
        assert sorted(seen) == list(range(base, base + world * span))  # disjoint and covering


def test_stream_wraps_across_shards_and_back_to_first(tmp_path):
    files = write_position_shards(tmp_path, "pos", "train", [5, 7, 3])
    loader = tg.DistributedTokenLoader(files, make_runtime(0, 1))
    np.testing.assert_array_equal(stream_of(loader, 10, 3), np.arange(40) % 15)


def test_stream_skips_empty_shards_and_rejects_all_empty(tmp_path):
    files = write_position_shards(tmp_path, "pos", "train", [3, 0, 2])
    np.testing.assert_array_equal(stream_of(tg.DistributedTokenLoader(files, make_runtime(0, 1)), 1, 6),
                                  [0, 1, 2, 3, 4, 0, 1])
    empty = write_position_shards(tmp_path, "none", "train", [0, 0])
    with pytest.raises(tg.UserError, match="hold no tokens"):
        tg.DistributedTokenLoader(empty, make_runtime(0, 1)).next_batch(1, 1)


def test_stream_checks_each_shard_once_however_often_it_is_reread(tmp_path, monkeypatch):
    files = write_position_shards(tmp_path, "pos", "train", [5, 7, 3])
    reads, real = [], tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda path, vocab=None: reads.append((path, vocab)) or real(path, vocab))
    loader = tg.DistributedTokenLoader(files, make_runtime(0, 1), vocab_size=16)
    np.testing.assert_array_equal(stream_of(loader, 9, 4), np.arange(45) % 15)
    checked = [path for path, vocab in reads if vocab == 16]
    assert sorted(checked) == sorted(files)  # three cycles, every shard checked exactly once
    assert len(reads) >= 9  # ... while every cycle re-reads the shards


def test_stream_reports_a_bad_later_shard_by_name(tmp_path):
    files = write_position_shards(tmp_path, "pos", "train", [4, 4])
    loader = tg.DistributedTokenLoader(files, make_runtime(0, 1), vocab_size=6)  # shard 1 holds ids 4..7
    with pytest.raises(tg.UserError, match=r"pos_train_000001\.bin: token id 6 at index 2 >= vocab size 6"):
        loader.next_batch(5, 5)


@pytest.mark.parametrize("damage", ["truncated", "bad_magic"])
def test_every_train_shard_header_is_checked_before_the_first_batch(tmp_path, damage):
    files = write_position_shards(tmp_path, "pos", "train", [4, 4, 4])
    data = open(files[2], "rb").read()
    bad = data[:-2] if damage == "truncated" else np.int32(7).tobytes() + data[4:]
    open(files[2], "wb").write(bad)
    with pytest.raises(tg.UserError, match=r"pos_train_000002\.bin: (truncated file|bad magic)"):
        tg.DistributedTokenLoader(files, make_runtime(0, 1))  # before any batch, not when it reaches shard 2


def test_loader_batch_straddles_wrap(tmp_path):
    files = write_position_shards(tmp_path, "pos", "train", [6, 4])
    loader = tg.DistributedTokenLoader(files, make_runtime(1, 2))
    x, y = loader.next_batch(4, 2)  # span 5 per rank: rank 1 takes stream positions 5..9
    torch.testing.assert_close(x.flatten(), torch.tensor([5, 6, 7, 8]))
    x, y = loader.next_batch(4, 2)  # positions 10..19 wrap to 0..9; rank 1 gets 15..19 = 5..9
    torch.testing.assert_close(y.flatten(), torch.tensor([6, 7, 8, 9]))


# ----------------------------------------------------------------------------------------------------------------
# Validation loader
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def val_tokens(tmp_path, tiny_corpus, tiny):
    """(lengths of the val shards, EVAL_SEQ_LEN, VAL_MAX_TOKENS) -> the tokens load_val_data keeps, from shards whose
    tokens are their stream positions."""
    _, tok, vocab = tiny_corpus

    def load(lengths, seq_len=8, cap=0):
        write_position_shards(tmp_path, "pos", "val", lengths)
        h = tiny(data_path=str(tmp_path), tokenizer_path=tok, vocab_size=vocab, eval_seq_len=seq_len, val_max_tokens=cap)
        return tg.load_val_data(h, tg.load_tokenizer(h)).tokens
    return load


def test_validation_truncates_to_whole_sequences_plus_one(val_tokens):
    tokens = val_tokens([60, 40])
    assert tokens.dtype == torch.int64
    torch.testing.assert_close(tokens, torch.arange(97))  # (100 - 1) // 8 * 8 = 96 targets + 1


def test_validation_exact_multiple_keeps_everything(val_tokens):
    assert val_tokens([17]).numel() == 17


@pytest.mark.parametrize("cap,expected_targets", [(20, 16), (16, 16), (3, 8), (1000, 96)])
def test_validation_cap(val_tokens, cap, expected_targets):
    torch.testing.assert_close(val_tokens([100], cap=cap), torch.arange(expected_targets + 1))


def test_validation_too_short_is_an_error(val_tokens):
    with pytest.raises(tg.UserError, match="fewer than one sequence of EVAL_SEQ_LEN=8"):
        val_tokens([8])


def test_loader_on_cuda_copies_each_batch_once_from_pinned_memory_without_blocking(tmp_path, monkeypatch):
    """A fake CUDA device (the copies are recorded and done on the CPU): every micro-batch is one pinned,
    non-blocking host-to-device copy holding inputs and targets."""
    files = write_position_shards(tmp_path, "pos", "train", [1000])
    loader = tg.DistributedTokenLoader(files, tg.Runtime(1, 2, 1, torch.device("cuda", 1), True))
    with FakeCudaTransfers(monkeypatch) as fake:
        batches = [loader.next_batch(8, 4) for _ in range(3)]
    assert fake.log == [("pin",), ("to_cuda", True, True)] * 3
    for i, (x, y) in enumerate(batches):  # rank 1 of 2: span 9 of every 18 stream positions
        torch.testing.assert_close(x.flatten(), torch.arange(8) + 18 * i + 9)
        torch.testing.assert_close(y.flatten(), torch.arange(8) + 18 * i + 10)


def test_prefetch_keeps_the_stream_order(tmp_path):
    files = write_position_shards(tmp_path, "pos", "train", [500, 300])
    plain, ahead = (tg.DistributedTokenLoader(files, make_runtime(0, 1)) for _ in range(2))
    for step in range(40):
        if step % 3:
            ahead.prefetch(16, 8)  # as train() does before the step's sync (a second call does nothing)
            ahead.prefetch(16, 8)
        for want, got in zip(plain.next_batch(16, 8), ahead.next_batch(16, 8)):
            torch.testing.assert_close(got, want)
    ahead.prefetch(16, 8)
    with pytest.raises(ValueError, match="prefetched a batch"):
        ahead.next_batch(8, 8)
