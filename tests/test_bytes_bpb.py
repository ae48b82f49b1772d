"""Byte tables, count_bytes and the bpb formula on a tiny SentencePiece model trained in a temp dir.

Run: python3 -m pytest tests/test_bytes_bpb.py
"""
import math
import os

import pytest
import torch

import train_gpt as tg
from conftest import RT1, random_stream, tiny_model, train_tokenizer, unit_tables

SP = "\u2581"
CORPUS = ["The quick brown fox jumps over the lazy dog near the river bank.",
          "A caf\u00e9 in the town sold 123 cakes and 45 pies on Monday, said the owner.",
          "Numbers like 2024 and 1999 are split into digits by the tokenizer."] * 30
# Plain ASCII/Latin text with single spaces and no surrounding whitespace: nmt_nfkc leaves it unchanged.
DOCS = ["The fox and the dog sat by the river.", "A caf\u00e9 sold 7 cakes.", "Gru\u00df \u20ac 12 ok",
        "Monday said the owner of the bank.", "x"]


@pytest.fixture(scope="module")
def sp():
    """A BPE model trained by make_dataset.py, vocab 330 (4 specials + 256 byte pieces + chars + merges)."""
    return train_tokenizer(CORPUS, 330)[0]


@pytest.fixture(scope="module")
def tables(sp):
    return tg.build_byte_luts(sp, sp.vocab_size())


def bytes_of(tables, prev_id, tgt_id):
    return int(tg.count_bytes(torch.tensor([prev_id]), torch.tensor([tgt_id]), tables)[0])


def piece_id(sp, piece):
    i = sp.piece_to_id(piece)
    assert sp.id_to_piece(i) == piece, f"{piece!r} is not in the tiny vocabulary"
    return i


def encode_docs(sp, docs):
    """The training/eval stream layout: BOS before every document, no EOS."""
    return torch.tensor([t for d in docs for t in (1, *sp.encode(d))], dtype=torch.int64)


def test_control_and_unknown_tokens_are_zero_byte_boundaries(sp, tables):
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert tables.base_bytes[i] == 0 and tables.is_boundary[i] and not tables.has_leading_space[i]
    normal = piece_id(sp, "he")
    for i in (0, 1, 2, 3):
        assert bytes_of(tables, normal, i) == 0


def test_byte_fallback_pieces_count_one_byte(sp, tables):
    for b in (0x00, 0x41, 0xC3, 0xFF):
        i = piece_id(sp, f"<0x{b:02X}>")
        assert tables.base_bytes[i] == 1 and not tables.is_boundary[i] and not tables.has_leading_space[i]
        assert bytes_of(tables, 1, i) == 1 and bytes_of(tables, piece_id(sp, "he"), i) == 1


def test_leading_space_piece_counts_space_except_after_boundary(sp, tables):
    word = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith(SP) and len(sp.id_to_piece(i)) > 2)
    text_bytes = len(sp.id_to_piece(word)[1:].encode("utf-8"))
    assert tables.has_leading_space[word] and tables.base_bytes[word] == text_bytes
    assert bytes_of(tables, piece_id(sp, "he"), word) == text_bytes + 1  # after a normal piece: the space counts
    assert bytes_of(tables, piece_id(sp, "<0x41>"), word) == text_bytes + 1  # after a byte piece too
    for boundary in (0, 1, 2, 3):
        assert bytes_of(tables, boundary, word) == text_bytes  # after BOS etc.: no space byte


def test_lone_marker_piece_is_one_space(sp, tables):
    i = piece_id(sp, SP)
    assert tables.base_bytes[i] == 0 and tables.has_leading_space[i]
    assert bytes_of(tables, piece_id(sp, "he"), i) == 1


def test_multibyte_piece_counts_utf8_bytes(sp, tables):
    i = piece_id(sp, "\u00e9")
    assert tables.base_bytes[i] == 2


def test_ids_beyond_tokenizer_are_boundaries(sp):
    t = tg.build_byte_luts(sp, sp.vocab_size() + 6)
    assert t.base_bytes.numel() == sp.vocab_size() + 6
    assert t.is_boundary[sp.vocab_size():].all() and not t.base_bytes[sp.vocab_size():].any()


def test_independent_byte_count_matches_utf8_of_documents(sp, tables):
    assert [sp.decode(sp.encode(d)) for d in DOCS] == DOCS  # precondition: DOCS are normalisation-invariant
    stream = encode_docs(sp, DOCS)
    counted = int(tg.count_bytes(stream[:-1], stream[1:], tables).sum())
    assert counted == sum(len(d.encode("utf-8")) for d in DOCS)


def test_independent_byte_count_matches_decoded_text_on_corpus(sp, tables):
    docs = [c.replace("river", "r\u00f6ver \u20ac") for c in CORPUS[:3]] + ["Gr\u00fc\u00df Gott 99", "  lead  space"]
    stream = encode_docs(sp, docs)
    counted = int(tg.count_bytes(stream[:-1], stream[1:], tables).sum())
    assert counted == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)


def test_unit_tables_give_bpb_equal_loss_over_ln2(tiny):
    """One byte per target (unit tables): the evaluator's bpb is its loss in bits, bpb = loss / ln 2."""
    h = tiny(vocab_size=16)
    r = tg.sliding_eval(tiny_model(h), tg.ValData(random_stream(100, 16), unit_tables(16)), h, RT1)
    assert (r.tokens, r.bytes) == (100, 100) and r.loss > 0
    assert math.isclose(r.bpb, r.loss / math.log(2), rel_tol=1e-12)


def test_load_val_data_logs_independent_byte_count(sp, tmp_path, monkeypatch, capsys, tiny):
    monkeypatch.delenv("RANK", raising=False)
    docs = DOCS * 6
    stream = encode_docs(sp, docs).numpy()
    tg.write_shard(tmp_path / "tiny_val_000000.bin", stream[:70])
    tg.write_shard(tmp_path / "tiny_val_000001.bin", stream[70:])
    h = tiny(vocab_size=sp.vocab_size(), data_path=str(tmp_path), eval_seq_len=8, val_max_tokens=0)
    val = tg.load_val_data(h, sp)
    usable = (stream.size - 1) // 8 * 8
    assert val.num_targets == usable
    kept = stream[:usable + 1].tolist()
    # independent count: decode the kept targets document by document (BOS splits documents)
    expected, doc = 0, []
    for t in kept[1:] + [1]:
        if t == 1:
            expected += len(sp.decode(doc).encode("utf-8"))
            doc = []
        else:
            doc.append(t)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("val_loader ")][-1]
    pattern = os.path.join(str(tmp_path), "*_val_*.bin")
    assert line == f"val_loader pattern:{pattern} tokens:{usable} bytes:{expected}"
