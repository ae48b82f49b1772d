#!/usr/bin/env python3
"""Build an upstream record folder from finished per-seed logs.

    python3 tools/make_record.py --name ExactNgram11L --author "A B" --github-id ab logs/s1337.txt logs/s42.txt logs/s2024.txt

Creates <out>/<date>_<name>/ holding README.md (results, setup lines, reconstructed launch command, compliance
checklist backed by log lines), submission.json, train_seed<S>.log per log, train_gpt.py (the packed form of
--script, see tools/pack.py; a --script that is already packed is copied as it is) and requirements.txt (the
repository's requirements, torch pinned to the build the logs ran with, plus the FlashAttention-3 wheel when the
logs used it).

The logs must come from the packed file the folder ships: the counted code is the file that runs, so only a run of
that file shows the submission size the record claims (its `Total submission` line counts the packed bytes) and
only its logs let a reviewer match the folder's train_gpt.py to them byte for byte (code_sha256). Logs of the
readable script are refused with the commands that make the packed run.

Refuses with one `error:` line and nothing created (exit 2, tools/toolkit.py) when: a log is foreign, truncated,
failed or has a non-finite score (with --allow-incomplete: a log without a finite headline score); a file is given
twice; the packed script's sha256 or size differs from code_sha256 / code_bytes in ANY log; two logs share a seed;
the logs differ in settings other than seed/run_id; the folder exists (unless --force). With --strict, a failed
compliance check is exit 4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import logparse  # noqa: E402
import summarize_logs  # noqa: E402
import toolkit  # noqa: E402
import train_gpt as tg  # noqa: E402

# the challenge limits: size and training time as the script's defaults state them; the rest are checked only here
SIZE_LIMIT = tg.Hyperparameters.artifact_limit_bytes  # code + compressed model may reach it, not exceed it
TRAIN_TIME_LIMIT_S = tg.Hyperparameters.max_wallclock_seconds
EVAL_TIME_LIMIT_S = 600.0  # export + evaluation after training take at most 10 minutes
PER_RUN_KEYS = ("seed", "run_id", "artifact_path")  # settings allowed to differ between the seeds of one record
NAME_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"  # the packages train_gpt.py imports
FINEWEB_DATA_PATH = tg.Hyperparameters.data_path
FINEWEB_DOWNLOAD = "python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80"
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"  # the PyTorch wheel index of a local build tag (cu128, cpu)
FA3_WHEELS = "https://windreamer.github.io/flash-attention3-wheels/{tag}_torch{version}"  # prebuilt FA3, per build

# Prints {field: logged text of its default}: the `hparam name:value` lines of the script's default Hyperparameters.
DEFAULTS_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("record_script", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
lines = [line.split(" ", 1)[1] for line in mod.Hyperparameters().log_lines()]
print(json.dumps(dict(line.split(":", 1) for line in lines)))
"""


class RecordError(toolkit.ToolError):
    """A reason to refuse building the record (exit 2)."""


# ------------------------------------------------------------------ checks before anything is written

def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packed_script(script: Path) -> tuple[bytes, str]:
    """(bytes of the packed form of the script, sha256 of the readable source it carries)."""
    if not script.is_file():
        raise RecordError(f"script not found: {script}")
    try:
        code = tg.code_identity(str(script))
    except (UnicodeDecodeError, ValueError, OSError) as exc:  # not UTF-8, a packed file that does not decode
        raise RecordError(f"{script}: not a readable or packed train_gpt.py ({exc})") from None
    packed = script.read_bytes() if code.packed else tg.pack_source(code.source).encode("utf-8")
    return packed, code.source_sha256


def check_code(runs, script: Path, packed: bytes, source_sha: str) -> str:
    """The packed script must be the code that produced every log (sha256 and size); returns its sha256."""
    digest, size = hashlib.sha256(packed).hexdigest(), len(packed)
    readable = [r for r in runs if r.code_form == "readable" or (r.code_sha256 == source_sha != digest)]
    if readable:
        raise RecordError(
            f"{', '.join(str(r.path) for r in readable)}: produced by the readable train_gpt.py; a record's logs come "
            f"from the packed file it ships (its bytes are the counted code): python3 tools/pack.py pack {script} -o "
            "packed/train_gpt.py, run torchrun ... packed/train_gpt.py, and pass those logs")
    bad = [f"  {r.path}: code_sha256:{r.code_sha256 or '(no code_sha256 line)'}" for r in runs if r.code_sha256 != digest]
    if bad:
        same_source = any(r.source_sha256 == source_sha for r in runs if r.code_sha256 != digest)
        hint = ("\n(they ran a packed file of this same source whose bytes differ from the one packed here: pass the "
                "file that ran with --script)" if same_source else "")
        raise RecordError(f"the packed {script} (sha256 {digest}) is not the code of these logs:\n" + "\n".join(bad)
                          + hint)
    wrong_size = [f"  {r.path}: code_bytes:{r.code_bytes}" for r in runs if r.code_bytes != size]
    if wrong_size:
        raise RecordError(f"the packed {script} has {size} bytes but the logs say otherwise:\n" + "\n".join(wrong_size))
    return digest


def check_seeds_and_settings(runs) -> None:
    """One log per seed, and identical settings apart from seed and run id."""
    seeds = [r.seed for r in runs]
    if None in seeds:
        raise RecordError(f"{runs[seeds.index(None)].path}: no 'hparam seed:' line")
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        raise RecordError(f"several logs for seed(s) {dupes}: one log per seed")
    ref = runs[0].hparams
    for run in runs[1:]:
        keys = sorted(k for k in set(ref) | set(run.hparams)
                      if k not in PER_RUN_KEYS and ref.get(k) != run.hparams.get(k))
        if keys:
            diffs = ", ".join(f"{k}: {ref.get(k)} vs {run.hparams.get(k)}" for k in keys)
            raise RecordError(f"{runs[0].path} and {run.path} differ in settings other than the seed ({diffs})")


# ------------------------------------------------------------------ compliance checklist

def compliance(runs) -> list[dict]:
    """One item per rule: {'rule', 'ok' (True/False/None = not applicable), 'evidence': [lines]}."""
    items = [_check_size(runs), _check_train_time(runs), _check_post_time(runs), _check_full_val(runs)]
    if any(r.event("ngram_start") or r.ngram_exact or r.event("ngram_hashed_unnormalized_exact") for r in runs):
        items += [_check_single_pass(runs), _check_normalization(runs)]
    return items


def _item(rule: str, results) -> dict:
    """Combine per-seed (ok, evidence) pairs into one checklist item."""
    return {"rule": rule, "ok": all(ok for ok, _ in results), "evidence": [ev for _, ev in results]}


def _ev(run, name: str) -> str:
    """Evidence text: the seed and the quoted last line of an event."""
    return f"seed {run.seed}: `{run.lines.get(name, f'(no {name} line)')}`"


def _check_size(runs) -> dict:
    """Total submission bytes within the limit (the script's rule) and no artifact_over_limit line."""
    results = []
    for r in runs:
        ok = (r.total_bytes is not None and not tg.over_size_limit(r.total_bytes, SIZE_LIMIT)
              and not r.event("artifact_over_limit"))
        results.append((ok, _ev(r, "total_submission")))
    return _item(f"artifact total (compressed model + code) <= {SIZE_LIMIT:,} bytes", results)


def _check_train_time(runs) -> dict:
    """Training time from the stopping_early line (else the last step line)."""
    results = []
    for r in runs:
        line = r.lines.get("stopping_early") or (r.step_lines[-1]["line"] if r.step_lines else "(no step line)")
        ok = r.train_time_ms is not None and r.train_time_ms <= TRAIN_TIME_LIMIT_S * 1000
        results.append((ok, f"seed {r.seed}: `{line}`"))
    return _item(f"training time <= {TRAIN_TIME_LIMIT_S:.0f} s", results)


def _check_post_time(runs) -> dict:
    """post_training_time line present and within the limit."""
    results = [(r.post_training_ms is not None and r.post_training_ms <= EVAL_TIME_LIMIT_S * 1000,
                _ev(r, "post_training_time"))
               for r in runs]
    return _item(f"post-training time (export + evaluation) <= {EVAL_TIME_LIMIT_S:.0f} s", results)


def _check_full_val(runs) -> dict:
    """No validation cap (val_max_tokens:0); the val_loader line shows tokens and bytes."""
    results = [(r.hparams.get("val_max_tokens", "0") == "0",
                f"seed {r.seed}: `hparam val_max_tokens:{r.hparams.get('val_max_tokens', '(not logged)')}`; "
                f"`{r.lines.get('val_loader', '(no val_loader line)')}`") for r in runs]
    return _item("scored on the whole validation split (val_max_tokens:0)", results)


def _check_single_pass(runs) -> dict:
    """Exact (normalized, score-first) n-gram mode in settings and in the eval start line."""
    results = []
    for r in runs:
        mode = r.hparams.get("ngram_mode")
        ok = mode == "exact" and r.event("ngram_start").get("mode") == "exact" and bool(r.ngram_exact)
        results.append((ok, f"seed {r.seed}: `hparam ngram_mode:{mode}`; `{r.lines.get('ngram_start', '(no start line)')}`"))
    return _item("n-gram cache scores first, single pass (ngram_mode exact, normalized ngram_eval_exact)", results)


def _check_normalization(runs) -> dict:
    """ngram_audit sums (min, median, max) within the script's tolerance of 1."""
    results = []
    for r in runs:
        a = r.event("ngram_audit")
        ok = bool(a) and tg.audit_normalized([a[k] for k in ("sum_min", "sum_median", "sum_max")])
        results.append((ok, _ev(r, "ngram_audit")))
    return _item(f"normalization audit: mixed distributions sum to 1 within {tg.NGRAM_AUDIT_TOLERANCE:g}", results)


# ------------------------------------------------------------------ launch command

def script_defaults(script: Path) -> dict[str, str] | None:
    """Logged text of every Hyperparameters default of the script, or None if it cannot be imported."""
    return _defaults_of(script.resolve(), sha256_file(script))


@functools.lru_cache(maxsize=8)
def _defaults_of(script: Path, sha256: str) -> dict[str, str] | None:
    """script_defaults of one version of a script (the probe imports torch: once per content is enough)."""
    try:
        out = subprocess.run([sys.executable, "-c", DEFAULTS_PROBE, str(script)], capture_output=True,
                             text=True, timeout=120, cwd=script.parent)
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


def launch_env(runs, defaults: dict[str, str] | None) -> dict[str, str]:
    """ENV_VAR -> value for settings that differ from the defaults (all settings when defaults are unknown)."""
    hp = runs[0].hparams
    keys = [k for k in sorted(hp) if k not in PER_RUN_KEYS and (defaults is None or defaults.get(k) != hp[k])]
    return {k.upper(): hp[k] for k in keys}


def launch_command(env: dict[str, str], seed: int, world_size: int | None, script: str = "train_gpt.py") -> str:
    """Shell command for one seed."""
    parts = [f"{k}={_shell_quote(v)}" for k, v in env.items()] + [f"SEED={seed}"]
    return " ".join(parts + [f"torchrun --standalone --nproc_per_node={world_size or 8} {script}"])


def _shell_quote(value: str) -> str:
    """Quote a value for a POSIX shell when it has special characters."""
    return value if re.fullmatch(r"[A-Za-z0-9_.,:/+=-]+", value) else "'" + value.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------ setup

def torch_build(runs) -> tuple[str | None, str | None]:
    """(version, local build tag) of the torch the first log ran, e.g. ('2.9.1', 'cu128'); None when not logged."""
    text = str(runs[0].runtime.get("torch") or "")
    version, _, tag = text.partition("+")
    return version or None, tag or None


def uses_fa3(runs) -> bool:
    return any(r.runtime.get("attention") == "fa3" for r in runs)


def requirements(runs) -> str:
    """requirements.txt: the wheel indexes, torch pinned to the logs' build, FA3 if used, the script's packages."""
    version, tag = torch_build(runs)
    fa3 = uses_fa3(runs) and version and tag
    lines = ["# pip install -r requirements.txt: the torch build the logs ran with"
             + (", the FlashAttention-3 wheel they used" if fa3 else "") + " and the packages train_gpt.py imports"]
    if tag:
        lines.append(f"--extra-index-url {TORCH_INDEX.format(tag=tag)}")
    if fa3:
        lines.append(f"--find-links {FA3_WHEELS.format(tag=tag, version=version.replace('.', ''))}")
    lines.append(f"torch=={version}" if version else "torch")
    if fa3:
        lines.append("flash_attn_3")
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        req = line.split("#", 1)[0].strip()
        if req and not re.match(r"torch\b", req):
            lines.append(req)
    return "\n".join(lines) + "\n"


def setup_lines(runs, data_command: str | None, folder: str) -> list[str]:
    """The shell lines that prepare a machine for the launch commands (run from the repository root)."""
    version, tag = torch_build(runs)
    build = f"torch {version}" + (f"+{tag}" if tag else "") if version else "torch"
    lines = [f"python3 -m pip install -r {folder}/requirements.txt   # {build}"
             + (", FlashAttention-3" if uses_fa3(runs) else "") + ", the script's packages"]
    data_path = runs[0].hparams.get("data_path", FINEWEB_DATA_PATH)
    if data_command:
        lines.append(data_command)
    elif data_path == FINEWEB_DATA_PATH:
        lines.append(f"{FINEWEB_DOWNLOAD}   # FineWeb sp1024 shards + tokenizer")
    else:
        lines.append(f"# DATA_PATH={data_path} is not FineWeb sp1024: make it as the runs did (--data-command)")
    return lines


# ------------------------------------------------------------------ outputs

def headline(runs) -> tuple[str, list[float], list[float]]:
    """Which score the record reports (n-gram exact if every log has it, else round trip) and its values; a log
    without that score, or with a non-finite one, is refused (submission.json never holds NaN)."""
    name = "ngram_eval_exact" if all(r.ngram_exact for r in runs) else "final_int6_zstd_roundtrip_exact"
    for r in runs:
        score = r.event(name)
        if not all(isinstance(score.get(k), (int, float)) and math.isfinite(score[k]) for k in ("val_loss", "val_bpb")):
            raise RecordError(f"{r.path}: {'non-finite' if score else 'no'} '{name}' score "
                              f"({score.get('line', 'the run stopped before it')}): a record needs a finite score "
                              "from every seed")
    return name, [r.event(name)["val_loss"] for r in runs], [r.event(name)["val_bpb"] for r in runs]


def submission(runs, args) -> dict:
    """submission.json content."""
    _, losses, bpbs = headline(runs)
    loss, _ = logparse.mean_std(losses)
    bpb, bpb_std = logparse.mean_std(bpbs)
    out = {"author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
           "date": args.date, "val_loss": round(loss, 8), "val_bpb": round(bpb, 8),
           "bytes_total": max(r.total_bytes for r in runs), "bytes_code": runs[0].code_bytes,
           "seeds": [r.seed for r in runs]}
    if bpb_std is not None:
        out["val_bpb_std"] = round(bpb_std, 8)
    return out


def readme(runs, args, sub: dict, env: dict, defaults_known: bool, checks: list[dict], sha: str, source_sha: str,
           folder: Path) -> str:
    """README.md text."""
    score_line, _, _ = headline(runs)
    summary = summarize_logs.summarize(runs)
    script = f"{folder.as_posix()}/train_gpt.py"
    out = [f"# {args.name}", "", args.blurb or "", "",
           f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(runs)} seeds, `{score_line}`"
           + (f", std {sub['val_bpb_std']:.8f}" if "val_bpb_std" in sub else "") + f"), val_loss {sub['val_loss']:.8f} nats; "
           f"largest artifact {sub['bytes_total']:,} bytes (code {sub['bytes_code']:,} bytes).", "",
           "## Results per seed", "", summarize_logs.render_markdown(summary), "",
           "## Setup", "", "From the root of a checkout of the repository (its `data/` scripts make the data):", "",
           "```bash", *setup_lines(runs, args.data_command, folder.as_posix()), "```",
           "", "## Launch", "",
           ("Settings that differ from the defaults of `train_gpt.py`:" if defaults_known else
            "The script's defaults could not be read, so every logged setting is listed:"), "", "```bash"]
    out += [launch_command(env, r.seed, r.world_size, script) for r in runs]
    out += ["```", "", f"Code: `train_gpt.py` is the packed script ({sub['bytes_code']:,} bytes counted), sha256 "
            f"`{sha}` (equal to `code_sha256` in every log, whose `code:packed` says the packed file ran). It carries "
            f"the readable source, sha256 `{source_sha}` (`source_sha256` in the logs); `python3 tools/pack.py unpack "
            f"{script} -o train_gpt_readable.py` writes it back byte for byte.", "",
            "## Compliance checklist", "", "Each item is backed by the quoted log lines.", ""]
    for item in checks:
        out.append(f"- [{'x' if item['ok'] else ' '}] {'PASS' if item['ok'] else 'FAIL'}: {item['rule']}")
        out += [f"  - {ev}" for ev in item["evidence"]]
    out += ["", "## Files", "", "- `train_gpt.py`: the packed script that produced the logs",
            "- `requirements.txt`: the torch build and packages of the runs (see Setup)",
            *[f"- `train_seed{r.seed}.log`: log of seed {r.seed} (from `{r.path.name}`)" for r in runs],
            "- `submission.json`: record metadata", ""]
    return "\n".join(out)


def write_record(folder: Path, files: dict[str, str], copies: dict[str, Path]) -> None:
    """Write into a temporary sibling folder, then move it into place (replacing the old one with --force); a
    failure or an interrupt leaves no temporary folder and the old record, if any, as it was."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in copies.items():
            shutil.copyfile(src, tmp / name)
        with toolkit.interrupts_held():  # the swap completes once begun
            toolkit.swap_in(tmp, folder)  # build() refused an existing folder unless --force
    except OSError as e:
        raise RecordError(f"cannot write {e.filename or folder} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(args) -> Path:
    """All checks first, then write the folder; raises RecordError or LogError to refuse."""
    if not NAME_RX.fullmatch(args.name):
        raise RecordError(f"--name {args.name!r}: use letters, digits, '_', '.', '-'")
    runs = logparse.load_runs(toolkit.distinct_files(args.logs), complete=not args.allow_incomplete)
    script = Path(args.script)
    packed, source_sha = packed_script(script)
    sha = check_code(runs, script, packed, source_sha)
    check_seeds_and_settings(runs)
    folder = Path(args.out) / f"{args.date}_{args.name}"
    if folder.exists() and not args.force:
        raise RecordError(f"{folder} already exists (use --force to replace it)")
    checks = compliance(runs)
    failed = [c["rule"] for c in checks if not c["ok"]]
    if failed and args.strict:
        raise toolkit.CheckFailed("compliance checks failed (--strict): " + "; ".join(failed) + "; nothing was created")
    for rule in failed:
        print(f"warning: compliance check failed: {rule}", file=sys.stderr)
    defaults = script_defaults(script)
    env = launch_env(runs, defaults)
    sub = submission(runs, args)
    files = {"README.md": readme(runs, args, sub, env, defaults is not None, checks, sha, source_sha, folder),
             "submission.json": json.dumps(sub, indent=2, allow_nan=False) + "\n", "requirements.txt": requirements(runs),
             "train_gpt.py": packed.decode("utf-8")}
    copies = {f"train_seed{r.seed}.log": r.path for r in runs}
    write_record(folder, files, copies)
    return folder


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (every flag has help)."""
    p = logparse.cli_parser(__doc__)
    p.add_argument("logs", nargs="+", metavar="LOG", help="finished train_gpt.py logs, one per seed")
    p.add_argument("--name", required=True, help="record name; the folder is <out>/<date>_<name>")
    p.add_argument("--date", default=dt.date.today().isoformat(), help="record date YYYY-MM-DD (default today)")
    p.add_argument("--author", default="", help="author name for submission.json")
    p.add_argument("--github-id", default="", help="GitHub user id for submission.json")
    p.add_argument("--blurb", default="", help="one-paragraph description for submission.json and README.md")
    p.add_argument("--script", default="train_gpt.py",
                   help="the readable train_gpt.py (packed here) or the packed file that produced the logs "
                        "(default train_gpt.py)")
    p.add_argument("--data-command", default=None,
                   help="the setup line that makes DATA_PATH (default: the FineWeb sp1024 download when DATA_PATH is "
                        "the default)")
    p.add_argument("--out", default="records/track_10min_16mb", help="parent folder (default records/track_10min_16mb)")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    p.add_argument("--strict", action="store_true", help="refuse when any compliance check fails")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept logs of failed or unfinished runs (refused by default: they lack final scores)")
    return p


@toolkit.entry()
def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        dt.date.fromisoformat(args.date)
    except ValueError:
        build_parser().error(f"--date {args.date!r} is not a YYYY-MM-DD date")
    try:
        folder = build(args)
    except toolkit.ToolError as exc:
        raise RecordError(f"{exc}; nothing was created") from None
    print(folder)
    return toolkit.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
