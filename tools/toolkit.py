"""What every command in tools/ and data/ shares: the exit codes, one-line errors, interrupts, argument checks.

Exit codes (the same for train_gpt.py; README "When something is wrong"):
  0        success: the thing was made, the check passed
  1        a bug: an uncaught exception with its traceback (Python's own code; nothing else returns 1)
  2        user error: an argument, setting, path, permission or input the user controls; one `error: ...` line on
           stderr, nothing half-written (argparse's syntax errors print the same one line here)
  3        an artifact over the size limit (train_gpt.py)
  4        a failed check or a negative verdict (preflight not_ready, significance test not passed, a decode that
           does not reproduce its input)
  130/143  interrupted by SIGINT/SIGTERM: one line, temporary files removed, earlier outputs intact

`@entry(*user_errors)` wraps a tool's `main(argv)` in these paths: ToolError and the given exception types give
exit 2, CheckFailed exit 4, SIGINT/SIGTERM (raised as `Interrupted` so `finally` blocks clean up) 130/143. Under
torchrun only rank 0 prints the line. `ArgParser` prints argparse's own errors as that one line, and the argument
types below refuse out-of-range and non-finite numbers while parsing. Also the small helpers tools share instead of
reaching into train_gpt.py: atomic writes, the settings' text form, peak memory, a flag agreed by every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_OVER_LIMIT, EXIT_FAILED = 0, 1, 2, 3, 4
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ToolError(ValueError):
    """A user error in a tool (argument, file, input): one `error: ...` line, exit 2."""


class CheckFailed(RuntimeError):
    """A check the tool exists to make did not pass: one `error: ...` line, exit 4."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the tool ends with exit code 128 + signal number. `detail` may say what was kept."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code, self.detail = 128 + signum, ""


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def one_line(text) -> str:
    """A message on one line (a multi-line explanation joined by spaces)."""
    return " ".join(str(text).split())


def say_error(message) -> None:
    """The one `error: ...` line on stderr (rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def interrupts_raised():
    """SIGINT and SIGTERM raise Interrupted inside the block (so cleanup in `finally` runs); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def interrupts_held():
    """SIGINT/SIGTERM arriving inside the block are held and delivered when it has finished (for a commit of several
    renames that must happen together). Recorded by a Python handler, not masked: a thread mask does not hold a
    signal that the kernel hands to another thread (torch's, a reader's), and Python runs its handler anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # now, to the handler the caller had


def exit_code(fn, *args, user_errors: tuple = (), **kwargs) -> int:
    """fn(*args, **kwargs) -> exit code, through the shared exit paths (see the module docstring)."""
    with interrupts_raised():
        try:
            return fn(*args, **kwargs)
        except (ToolError, *user_errors) as e:
            say_error(e)
            return EXIT_USER
        except CheckFailed as e:
            say_error(e)
            return EXIT_FAILED
        except KeyboardInterrupt as e:
            code = getattr(e, "exit_code", 128 + signal.SIGINT)
            detail = getattr(e, "detail", "")
            say_error(f"stopped by {signal.Signals(code - 128).name}" + (f"; {detail}" if detail else ""))
            return code


def entry(*user_errors):
    """Decorator for a tool's main(argv): the same main, returning its exit code through exit_code()."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            return exit_code(main, *args, user_errors=user_errors, **kwargs)
        return run
    return wrap


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are the one `error: ...` line (exit 2); sub-parsers inherit it."""

    def error(self, message):
        self.exit(EXIT_USER, f"error: {one_line(message)} (see {self.prog} --help)\n")


def cli_parser(doc: str) -> ArgParser:
    """ArgParser whose description is the docstring's first paragraph and epilog the rest."""
    head, _, rest = doc.partition("\n\n")
    return ArgParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------ argument types (argparse `type=`)

def arg_type(parse, ok, wanted: str):
    """An argparse type: parse(text), finite and ok(value), else "must be <wanted>" (argparse names the flag)."""
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    check.__name__ = wanted
    return check


def int_in(lo: int, hi: int | None = None):
    """argparse type: an integer >= lo (and <= hi)."""
    return arg_type(int, lambda v: lo <= v and (hi is None or v <= hi),
                    f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")


positive_int = int_in(1)
non_negative_int = int_in(0)
positive_float = arg_type(float, lambda v: v > 0, "a finite number > 0")
non_negative_float = arg_type(float, lambda v: v >= 0, "a finite number >= 0")
probability = arg_type(float, lambda v: 0 < v < 1, "a number in (0, 1)")


# ------------------------------------------------------------------ inputs and outputs

def distinct_files(paths, what: str = "LOG") -> list[str]:
    """The paths, refused when one file is given twice (the same file under two names counts as twice)."""
    seen = {}
    for p in map(str, paths):
        try:
            st = os.stat(p)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.abspath(p)  # missing: the reader names it
        if key in seen:
            raise ToolError(f"{what} {p} is the same file as {seen[key]}: give each file once")
        seen[key] = p
    return list(map(str, paths))


def refuse_overwrite(output: str | None, inputs, flag: str) -> None:
    """An output path must not be one of the inputs (it would be destroyed before or while being read)."""
    if not output or output == "-":
        return
    for src in inputs:
        if src and os.path.exists(output) and os.path.exists(src) and os.path.samefile(output, src):
            raise ToolError(f"{flag} {output} is the input {src}: write the output somewhere else")


def swap_in(new: Path, final: Path, files=()) -> None:
    """Put the finished folder `new` in place of `final` and each (src, dst) file in place of dst; on a failure put
    the old folder back. Call it inside interrupts_held(): the renames belong together."""
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
        for src, dst in files:
            os.replace(src, dst)
    except BaseException:
        if not new.exists() and final.exists():
            final.rename(new)
        if old.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable(dest: str | None, flag: str = "--json") -> None:
    """Before minutes of work: the folder of an output path exists and is writable ('-' and None need nothing)."""
    if dest in (None, "-"):
        return
    folder = os.path.dirname(os.path.abspath(dest))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)) or os.path.isdir(dest):
        raise ToolError(f"{flag} {dest}: the folder does not exist or is not writable, or the path is a folder")


def torch_device(name: str):
    """torch.device for a --device flag: 'auto' is CUDA when visible, else the CPU; 'cuda' without a GPU is refused."""
    import torch
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ToolError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    return torch.device("cuda" if name == "auto" and cuda else "cpu" if name == "auto" else name)


def json_safe(value):
    """The value with non-finite floats as None (JSON has no NaN or infinity; json.dumps would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_file_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees a partial file, and an
    interrupted write leaves neither a partial file nor the temporary one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def format_setting(value) -> str:
    """A setting's value as the environment variable that gives it (what train_gpt.py's `hparam` lines print):
    tuples comma-joined, booleans 0/1."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def peak_memory_mib(device) -> dict:
    """The peak memory so far: on CUDA allocated and reserved MiB of the device, on the CPU the process's peak RSS."""
    import torch
    if torch.device(device).type == "cuda":
        return {"peak_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    import resource
    return {"peak_memory_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def any_rank(flag: bool, device) -> bool:
    """True on every rank if flag is true on any rank (one MAX all-reduce; alone, the flag itself)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
