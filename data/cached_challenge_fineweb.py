"""Download the official Parameter Golf FineWeb shards and tokenizer from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py --variant sp1024                 # 80 train shards + all val shards
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 1

Files come from the dataset repo willdepueoai/parameter-golf, sub-folder datasets/:
  datasets/datasets/fineweb10B_sp1024/fineweb_{train,val}_NNNNNN.bin  ->  data/datasets/fineweb10B_sp1024/
  datasets/tokenizers/fineweb_1024_bpe.model                           ->  data/tokenizers/
Files already present and valid are skipped, so the command can be re-run to resume or to add train shards.
Needs `pip install huggingface-hub` and network access; offline, build a corpus with
`python3 data/make_dataset.py --input sample --name sample` instead. Every file appears whole or not at all. Exit
codes (tools/toolkit.py): 2 with one `error:` line when the hub cannot be used, an option is wrong or --out-dir is
not writable; 4 when a file stays invalid after a fresh download; 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tools"))
import toolkit  # noqa: E402  (exit codes, one-line errors, interrupts)
import train_gpt  # noqa: E402  (the shard reader validates what we download)

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_PREFIX = "datasets"
OFFLINE_HINT = "offline, build a local corpus instead: python3 data/make_dataset.py --input sample --name sample"


class DownloadError(toolkit.ToolError):
    """The hub cannot be used or a file is missing; main() prints it and exits with status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every flag has help text."""
    p = toolkit.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sp1024", help="tokenizer variant spN (default sp1024)")
    p.add_argument("--train-shards", type=toolkit.non_negative_int, default=80,
                   help="number of train shards to fetch, from index 0 (default 80 = 8B tokens)")
    p.add_argument("--out-dir", default=str(ROOT), help="local root for datasets/ and tokenizers/ (default: data/)")
    p.add_argument("--repo-id", default=REPO_ID, help=f"Hugging Face dataset repo (default {REPO_ID})")
    p.add_argument("--remote-prefix", default=REMOTE_PREFIX,
                   help=f"folder inside the repo that mirrors data/ (default '{REMOTE_PREFIX}')")
    args = p.parse_args(argv)
    if not re.fullmatch(r"sp[1-9][0-9]*", args.variant):
        p.error(f"--variant must look like sp1024, got {args.variant!r}")
    return args


def variant_paths(variant: str) -> tuple[str, str]:
    """(dataset folder, tokenizer file) relative to data/ for a variant such as sp1024."""
    vocab = variant[2:]
    return f"datasets/fineweb10B_{variant}", f"tokenizers/fineweb_{vocab}_bpe.model"


def import_hub():
    """The huggingface_hub module, imported only when a download is needed."""
    try:
        import huggingface_hub
    except ImportError:
        raise DownloadError(f"huggingface_hub is not installed: pip install huggingface-hub; {OFFLINE_HINT}") from None
    return huggingface_hub


def list_remote_files(repo_id: str) -> list[str]:
    """Every file path in the dataset repo (one hub request)."""
    hub = import_hub()
    try:
        return list(hub.HfApi().list_repo_files(repo_id, repo_type="dataset"))
    except Exception as e:  # network, auth and offline-mode errors all mean: the hub cannot be used
        raise DownloadError(f"cannot list {repo_id} on the Hugging Face hub ({type(e).__name__}: {e}); "
                            f"{OFFLINE_HINT}") from None


def download_file(repo_id: str, remote_path: str, force: bool = False) -> Path:
    """Local path of one repo file in the huggingface_hub cache (downloaded if needed, or again if force)."""
    hub = import_hub()
    folder, name = os.path.split(remote_path)
    try:
        return Path(hub.hf_hub_download(repo_id=repo_id, filename=name, subfolder=folder or None,
                                        repo_type="dataset", force_download=force))
    except Exception as e:
        raise DownloadError(f"cannot download {remote_path} from {repo_id} ({type(e).__name__}: {e}); "
                            f"{OFFLINE_HINT}") from None


def plan_files(remote_files: list[str], variant: str, train_shards: int, prefix: str) -> list[str]:
    """Paths relative to data/: the first train_shards train shards, every val shard, and the tokenizer."""
    dataset_dir, tokenizer = variant_paths(variant)
    strip = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    local = {f[len(strip):] for f in remote_files if f.startswith(strip)}
    pattern = re.compile(re.escape(dataset_dir) + r"/fineweb_(train|val)_(\d{6})\.bin")
    shards = {"train": [], "val": []}
    for path in sorted(local):
        m = pattern.fullmatch(path)
        if m:
            shards[m.group(1)].append(path)
    if not shards["val"] or tokenizer not in local:
        raise DownloadError(f"the repo has no val shards or no {tokenizer} for variant {variant} under '{strip}'")
    if train_shards > len(shards["train"]):
        raise DownloadError(f"--train-shards {train_shards}: the repo has only {len(shards['train'])} train shards")
    return shards["train"][:train_shards] + shards["val"] + [tokenizer]


def is_valid_local(path: Path) -> bool:
    """True if the file exists and is a valid shard (train_gpt.read_shard) or a loadable SentencePiece model."""
    if not path.is_file():
        return False
    if path.suffix == ".bin":
        try:
            train_gpt.read_shard(path)
        except train_gpt.UserError:  # read_shard: not a valid shard
            return False
        return True
    try:
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size() > 0
    except Exception:
        return False


def place_file(cached: Path, dest: Path) -> None:
    """Hard-link the cached file to dest (copy across file systems); dest appears whole or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    try:
        try:
            os.link(cached, tmp)
        except OSError:
            shutil.copyfile(cached, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_one(repo_id: str, remote: str, dest: Path) -> None:
    """Place one file at dest; a cached copy that fails validation is downloaded once more before giving up."""
    for force in (False, True):
        place_file(download_file(repo_id, remote, force=force), dest)
        if is_valid_local(dest):
            return
    raise toolkit.CheckFailed(f"{dest}: the downloaded file is not valid (even after a fresh download)")


def fetch(args: argparse.Namespace) -> tuple[int, int]:
    """Download every planned file that is missing or invalid; returns (downloaded, skipped)."""
    out = Path(args.out_dir)
    plan = plan_files(list_remote_files(args.repo_id), args.variant, args.train_shards, args.remote_prefix)
    downloaded = skipped = 0
    for rel in plan:
        dest = out / rel
        if is_valid_local(dest):
            skipped += 1
            continue
        remote = f"{args.remote_prefix.strip('/')}/{rel}" if args.remote_prefix.strip("/") else rel
        fetch_one(args.repo_id, remote, dest)
        downloaded += 1
        print(f"cached_challenge_fineweb: {rel}", flush=True)
    return downloaded, skipped


@toolkit.entry(OSError)
def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with a one-line error when the hub, an option or --out-dir cannot be used, 4 when a
    download stays invalid."""
    args = parse_args(argv)
    downloaded, skipped = fetch(args)
    dataset_dir, tokenizer = variant_paths(args.variant)
    print(f"cached_challenge_fineweb: downloaded {downloaded}, already present {skipped}\n"
          f"  DATA_PATH={Path(args.out_dir) / dataset_dir}\n  TOKENIZER_PATH={Path(args.out_dir) / tokenizer}")
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
