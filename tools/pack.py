#!/usr/bin/env python3
"""Pack the readable train_gpt.py into the self-extracting file a record counts, or unpack one.

    python3 tools/pack.py pack train_gpt.py -o packed/train_gpt.py     # then: torchrun ... packed/train_gpt.py
    python3 tools/pack.py unpack packed/train_gpt.py -o readable.py   # the readable source, byte for byte

The packed file is the readable source, bz2-compressed and base85-encoded, executed by a four-line wrapper; it runs
exactly as the readable file does (same settings, log lines, scores and artifact bytes) and logs its own bytes as
the counted code plus the sha256 of the source it carries. Packing is deterministic and is done by train_gpt.py's
own pack_source / unpack_source, so a readable run's `packed_bytes` is what this tool writes. Prints one line
`pack source_bytes:… packed_bytes:… source_sha256:… packed_sha256:… out:…` (`--json PATH|-` as in every tool).
Exit status: 0 written; 2 user error (a missing file, a file that is already packed or not packed, an output
that would overwrite the input), one `error:` line and nothing written.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import logparse  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402


def read_text(path: Path) -> str:
    """The file's UTF-8 text, exactly (no newline translation)."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise logparse.ToolError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise logparse.ToolError(f"{path}: not UTF-8 text") from None


def convert(mode: str, src: Path, out: Path) -> dict:
    """Pack or unpack src into out (atomically); returns the figures of both forms."""
    if out.resolve() == src.resolve():
        raise logparse.ToolError(f"-o {out}: would overwrite the input; write to another path")
    text = read_text(src)
    try:
        code = tg.code_identity(str(src))  # readable or packed, told apart by the packed form's header
    except (ValueError, OSError) as exc:  # bad base85, a corrupt bz2 stream, bytes that are not UTF-8
        raise logparse.ToolError(f"{src}: the packed source cannot be decoded ({exc})") from None
    if mode == "pack" and code.packed:
        raise logparse.ToolError(f"{src} is already packed (use `unpack` to get the readable source)")
    if mode == "unpack" and not code.packed:
        raise logparse.ToolError(f"{src} is not a packed train_gpt.py (it lacks the packed form's header)")
    source = code.source
    packed = text if code.packed else tg.pack_source(source)
    try:
        toolkit.write_file_atomic(str(out), (packed if mode == "pack" else source).encode("utf-8"))
    except OSError as exc:
        raise logparse.ToolError(f"-o {out}: cannot write ({exc.strerror or exc})") from None
    digest = lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()
    return {"mode": mode, "source_bytes": len(source.encode("utf-8")), "packed_bytes": len(packed.encode("utf-8")),
            "source_sha256": digest(source), "packed_sha256": digest(packed), "out": str(out)}


def build_parser():
    p = toolkit.cli_parser(__doc__)
    p.add_argument("mode", choices=("pack", "unpack"), help="pack a readable script, or unpack a packed one")
    p.add_argument("script", nargs="?", default="train_gpt.py", help="input file (default train_gpt.py)")
    p.add_argument("-o", "--out", default=None,
                   help="output file (default: packed/train_gpt.py for pack, train_gpt.unpacked.py for unpack)")
    p.add_argument("--json", default=None, metavar="PATH|-", help="also write the figures as JSON (- = stdout only)")
    return p


@toolkit.entry()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or ("packed/train_gpt.py" if args.mode == "pack" else "train_gpt.unpacked.py"))
    toolkit.check_writable(args.json)
    result = convert(args.mode, Path(args.script), out)
    logparse.emit(" ".join([args.mode, *(f"{k}:{v}" for k, v in result.items() if k != "mode")]), result, args.json)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
