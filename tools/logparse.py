"""Parse the rank-0 log of train_gpt.py into one `RunLog` record (shared by every tool in tools/).

The log file holds one event per line, plus the script's source text, a separator and `nvidia-smi` output.
Every event has one regular expression in `PATTERNS`; a line is an event only if a pattern matches the WHOLE
line (after stripping the line ending and trailing blanks), so source-code lines that merely mention a prefix
(e.g. `log0(f"step:{step}/...`) are skipped. When a single-valued event appears twice, the last one wins.

Public API: `parse_log(path) -> RunLog`, `require_complete(run)`, `LogError`, `load_runs(paths, complete=True)`,
`emit(text, result, json_dest)`.

Conventions shared by every tool: a user error (a file, a log, an option value) prints one `error: ...` line and
exits 1; `--json PATH` writes the JSON result to PATH (temporary file + rename) and prints the usual text, while
`--json -` prints only the JSON on stdout and sends the text to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf"  # what Python's float formatting can print
INT = r"\d+"


def _n(name: str) -> str:
    """Named group for a float."""
    return rf"(?P<{name}>{NUM})"


def _i(name: str) -> str:
    """Named group for a non-negative integer."""
    return rf"(?P<{name}>{INT})"


# event name -> regex (matched with fullmatch). Group names become the event's fields.
PATTERNS: dict[str, re.Pattern] = {name: re.compile(rx) for name, rx in {
    "logfile": r"logs/(?P<run_id>[^\s/]+)\.txt",
    "hparam": r"hparam (?P<key>[a-z_][a-z0-9_]*):(?P<value>.*)",
    "code": rf"code_bytes:{_i('code_bytes')} code_sha256:(?P<code_sha256>[0-9a-f]{{64}})",
    "runtime": r"runtime (?P<fields>(?:\S+:\S+ ?)+)",
    "model_params": rf"model_params:{_i('model_params')}",
    "val_loader": rf"val_loader:shards pattern=(?P<pattern>\S+) tokens:{_i('tokens')}(?: bytes:{_i('bytes')})?",
    "warmup_step": rf"warmup_step:{_i('i')}/{_i('n')}",
    "val_step": (rf"step:{_i('step')}/{_i('total')} val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')} "
                 rf"train_time:{_n('train_time_ms')}ms step_avg:{_n('step_avg_ms')}ms"),
    "train_step": (rf"step:{_i('step')}/{_i('total')} train_loss:{_n('train_loss')} "
                   rf"train_time:{_n('train_time_ms')}ms step_avg:{_n('step_avg_ms')}ms"),
    "qat": rf"step:{_i('step')} QAT activated \(time_frac={_n('time_frac')}, scale={_n('scale')}\)",
    "swa_start": rf"swa:start step:{_i('step')}",
    "stopping_early": rf"stopping_early: wallclock_cap train_time:{_n('train_time_ms')}ms step:{_i('step')}/{_i('total')}",
    "peak_memory": rf"peak memory allocated: {_i('allocated_mib')} MiB reserved: {_i('reserved_mib')} MiB",
    "diag_eval": (rf"diag_eval_(?P<which>ema|swa|raw) val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')} "
                  rf"eval_time:{_n('eval_time_ms')}ms"),
    "export_weights": r"export_weights:(?P<which>ema|swa|raw)",
    "serialized": (rf"Serialized model int6\+zstd: {_i('model_bytes')} bytes \(payload:{_i('payload')} "
                   rf"raw_torch:{_i('raw_torch')} payload_ratio:{_n('payload_ratio')}x\)"),
    "total_submission": rf"Total submission int6\+zstd: {_i('total_bytes')} bytes",
    "artifact": (rf"artifact path:(?P<path>\S+) sha256:(?P<sha256>[0-9a-f]+) model_bytes:{_i('model_bytes')} "
                 rf"code_bytes:{_i('code_bytes')} total_bytes:{_i('total_bytes')} limit:{_i('limit')}"),
    "artifact_over_limit": rf"artifact_over_limit total_bytes:{_i('total_bytes')} limit:{_i('limit')} excess:{_i('excess')}",
    "roundtrip": rf"final_int6_zstd_roundtrip val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')} eval_time:{_n('eval_time_ms')}ms",
    "roundtrip_exact": rf"final_int6_zstd_roundtrip_exact val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')}",
    "roundtrip_int8_alias": rf"final_int8_zlib_roundtrip_exact val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')}",
    "ngram_start": (rf"Starting N-gram eval: order {_i('min_order')}-{_i('max_order')} mode=(?P<mode>\w+) "
                    rf"chunk={_i('chunk')}"),
    "ngram_chunk": rf"ngram_chunk \[{_i('k')}/{_i('total')}\] running_bpb:{_n('running_bpb')} elapsed:{_n('elapsed_s')}s",
    "ngram_audit": (rf"ngram_audit positions:{_i('positions')} sum_min:{_n('sum_min')} sum_median:{_n('sum_median')} "
                    rf"sum_max:{_n('sum_max')}"),
    "ngram_eval": rf"ngram_eval val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')} eval_time:{_n('eval_time_ms')}ms",
    "ngram_eval_exact": rf"ngram_eval_exact val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')}",
    "ngram_hashed": (rf"ngram_hashed_unnormalized val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')} "
                     rf"eval_time:{_n('eval_time_ms')}ms"),
    "ngram_hashed_exact": rf"ngram_hashed_unnormalized_exact val_loss:{_n('val_loss')} val_bpb:{_n('val_bpb')}",
    "post_training_time": rf"post_training_time:{_i('ms')}ms",
    "env_ignored": r"env_ignored name:(?P<name>\S+)",
    "run_failed": r"run_failed reason:(?P<reason>\w+)(?: (?P<detail>.*))?",
}.items()}

# events kept as lists (all occurrences, in order); every other event keeps its last occurrence only
LIST_EVENTS = ("hparam", "warmup_step", "val_step", "train_step", "ngram_chunk", "diag_eval")


class ToolError(ValueError):
    """A user error in a tool (file, option value); the tool prints `error: <message>` and exits 1."""


class LogError(ToolError):
    """A log that the tools cannot use (foreign file, truncated or failed run); the message names the file."""


@dataclass
class RunLog:
    """Everything the tools need from one log. Raw events are in `events`; derived values are properties."""

    path: Path
    events: dict[str, object] = field(default_factory=dict)  # name -> dict (last occurrence) or list of dicts
    lines: dict[str, str] = field(default_factory=dict)  # name -> text of the last matching line (evidence)

    # --- identity and settings ---
    @property
    def hparams(self) -> dict[str, str]:
        """Logged settings as strings, e.g. {'seed': '1337', 'ngram_mode': 'exact'}."""
        return {e["key"]: e["value"] for e in self.events.get("hparam", [])}

    @property
    def run_id(self) -> str:
        """Run id from the hparam line, else the `logs/<id>.txt` line, else the file stem."""
        rid = self.hparams.get("run_id") or self.event("logfile").get("run_id")
        return rid or self.path.stem

    @property
    def seed(self) -> int | None:
        """Seed from `hparam seed:`."""
        return _to_int(self.hparams.get("seed"))

    @property
    def world_size(self) -> int | None:
        """world_size from the `runtime` line."""
        return _to_int(self.runtime.get("world_size"))

    @property
    def runtime(self) -> dict[str, str]:
        """Fields of the `runtime key:value ...` line."""
        text = self.event("runtime").get("fields", "")
        return dict(tok.split(":", 1) for tok in text.split())

    def event(self, name: str) -> dict:
        """Last occurrence of a single-valued event (empty dict when absent)."""
        value = self.events.get(name)
        if isinstance(value, list):
            return value[-1] if value else {}
        return value or {}

    # --- training ---
    @property
    def step_lines(self) -> list[dict]:
        """Train and val step events merged in log order (each has step, train_time_ms, step_avg_ms)."""
        return self.events.get("_steps", [])

    @property
    def steps(self) -> int | None:
        """Steps completed: from the stopping_early line, else the last step line."""
        stop = self.event("stopping_early")
        if stop:
            return stop["step"]
        return self.step_lines[-1]["step"] if self.step_lines else None

    @property
    def step_avg_ms(self) -> float | None:
        """Average step time at the last step line."""
        return self.step_lines[-1]["step_avg_ms"] if self.step_lines else None

    @property
    def train_time_ms(self) -> float | None:
        """Training wall-clock: from the stopping_early line, else the last step line."""
        stop = self.event("stopping_early")
        if stop:
            return stop["train_time_ms"]
        return self.step_lines[-1]["train_time_ms"] if self.step_lines else None

    @property
    def tokens_per_s(self) -> float | None:
        """Global training throughput = train_batch_tokens / step_avg."""
        batch = _to_int(self.hparams.get("train_batch_tokens"))
        avg = self.step_avg_ms
        return batch / (avg / 1000.0) if batch and avg else None

    @property
    def tokens_per_s_per_device(self) -> float | None:
        """Throughput per device = tokens_per_s / world_size."""
        tps, world = self.tokens_per_s, self.world_size
        return tps / world if tps and world else None

    # --- results ---
    def diag_bpb(self, which: str) -> float | None:
        """val_bpb of the optional diag_eval_<which> line (ema, swa or raw)."""
        found = [e for e in self.events.get("diag_eval", []) if e["which"] == which]
        return found[-1]["val_bpb"] if found else None

    @property
    def roundtrip_exact(self) -> dict:
        """final_int6_zstd_roundtrip_exact fields (val_loss, val_bpb); empty when truncated."""
        return self.event("roundtrip_exact")

    @property
    def ngram_exact(self) -> dict:
        """The normalized n-gram score (ngram_eval_exact); empty for hashed-mode runs."""
        return self.event("ngram_eval_exact")

    @property
    def total_bytes(self) -> int | None:
        """Compressed model + code bytes from `Total submission int6+zstd:`."""
        return self.event("total_submission").get("total_bytes")

    @property
    def code_bytes(self) -> int | None:
        """Script size from the `code_bytes:` line."""
        return self.event("code").get("code_bytes")

    @property
    def code_sha256(self) -> str | None:
        """Script sha256 from the `code_sha256:` field."""
        return self.event("code").get("code_sha256")

    @property
    def post_training_ms(self) -> int | None:
        """Export + evaluation time from `post_training_time:`."""
        return self.event("post_training_time").get("ms")


def _to_int(text) -> int | None:
    """int(text) or None for missing/non-integer text."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _convert(groups: dict[str, str]) -> dict:
    """Turn regex groups into ints/floats where they look numeric; keep other text as is."""
    out = {}
    for key, text in groups.items():
        if text is None or key in ("key", "value", "fields", "pattern", "path", "sha256", "code_sha256", "run_id"):
            out[key] = text
        elif re.fullmatch(INT, text):
            out[key] = int(text)
        elif re.fullmatch(NUM, text):
            out[key] = float(text)
        else:
            out[key] = text
    return out


def match_line(line: str) -> tuple[str, dict] | None:
    """(event name, fields) for a log line, or None when the line is not an event."""
    text = line.rstrip()
    for name, pattern in PATTERNS.items():
        m = pattern.fullmatch(text)
        if m:
            return name, _convert(m.groupdict())
    return None


def parse_text(text: str, path: Path | str = "<text>") -> RunLog:
    """Parse log text into a RunLog (no completeness checks)."""
    run = RunLog(path=Path(path))
    for line in text.splitlines():
        hit = match_line(line)
        if hit is None:
            continue
        name, fields = hit
        if name in LIST_EVENTS:
            run.events.setdefault(name, []).append(fields)
        else:
            run.events[name] = fields
        if name in ("val_step", "train_step"):
            run.events.setdefault("_steps", []).append(dict(fields, kind=name, line=line.rstrip()))
        run.lines[name] = line.rstrip()
    return run


def parse_log(path: Path | str) -> RunLog:
    """Read and parse one log file; raise LogError for unreadable or foreign files (no hparam lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    run = parse_text(text, path)
    if not run.events.get("hparam"):
        raise LogError(f"{path}: not a train_gpt.py log (no 'hparam <field>:<value>' lines)")
    return run


def incomplete_reason(run: RunLog) -> str | None:
    """Why the log is not a finished, successful run (None when it is): a `run_failed` line, or a missing final line
    (round trip; the n-gram score when NGRAM_ENABLED; post_training_time, the last line of every finished run)."""
    failed = run.event("run_failed")
    if failed:
        return f"the run failed ({run.lines['run_failed']})"
    if not run.roundtrip_exact:
        return f"truncated log (no 'final_int6_zstd_roundtrip_exact' line); last event: {_last_event(run)}"
    wants_ngram = run.hparams.get("ngram_enabled", "1") == "1"
    if wants_ngram and not (run.ngram_exact or run.event("ngram_hashed_exact")):
        return "truncated log (no n-gram score: stopped during the n-gram eval)"
    if run.post_training_ms is None:
        return "truncated log (no 'post_training_time' line)"
    return None


def require_complete(run: RunLog) -> RunLog:
    """Raise LogError unless the log is a finished, successful run."""
    reason = incomplete_reason(run)
    if reason:
        raise LogError(f"{run.path}: {reason}")
    return run


def _last_event(run: RunLog) -> str:
    """Human-readable hint of how far the run got."""
    if run.step_lines:
        return f"step {run.step_lines[-1]['step']}"
    return "before training" if run.events else "none"


def load_runs(paths, complete: bool = True) -> list[RunLog]:
    """Parse several logs; with complete=True every one must have the final round-trip line."""
    runs = [parse_log(p) for p in paths]
    if complete:
        for run in runs:
            require_complete(run)
    return runs


def emit(text: str, result, json_dest: str | None) -> None:
    """Print `text` and the JSON `result` as `--json PATH|-` says (see the module docstring)."""
    if json_dest == "-":
        print(text, file=sys.stderr, flush=True)
        print(json.dumps(result, indent=2), flush=True)
        return
    print(text, flush=True)
    if json_dest:
        path = Path(json_dest)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise ToolError(f"--json {json_dest}: cannot write ({exc.strerror or exc})") from None
        finally:
            tmp.unlink(missing_ok=True)


def cli_parser(doc: str) -> argparse.ArgumentParser:
    """ArgumentParser whose description is the module docstring's first paragraph and epilog the rest."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the non-None values; std None for fewer than 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, var ** 0.5
