"""Parse the rank-0 log of train_gpt.py into one `RunLog` record (shared by every tool in tools/).

Every line train_gpt.py writes for machines is `event key:value key:value ...` (the event may carry a value, as
in `step:7/20 train_loss:...`; a last `detail:` field holds free text); two upstream spellings kept byte for byte
(`Total submission int6+zstd: N bytes`, `stopping_early: <reason> ...`) are rewritten into that form first. Values
become numbers where they are numbers, `N/M` counters become `key` and `key_of`, and `123ms` / `1.5s` become
`key_ms` / `key_s`. The log file also holds the script's source text after the header; those lines are no events
(a line needs a `key:value` field to be one) and land in `RunLog.unparsed`.

Public API: `parse_log(path) -> RunLog`, `require_complete(run)`, `LogError`, `load_runs(paths, complete=True)`,
`emit(text, result, json_dest)`.

Conventions shared by every tool (exit codes and error lines: toolkit.py): `--json PATH` writes the JSON result to
PATH (temporary file + rename; non-finite figures become null) and prints the usual text, while `--json -` prints
only the JSON on stdout and sends the text to stderr. A log whose scores are not finite is a failed run.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import toolkit
from toolkit import ToolError

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf"  # what Python's float formatting can print
INT = r"-?\d+"
KEY = r"[a-z_][a-z0-9_]*"
# `event key:value ...` (the event may carry a value itself, as in `step:7/20 train_loss:...`); a last field named
# `detail` holds free text. A line with neither a head value nor a field is no event (source code, prose).
EVENT_LINE = re.compile(rf"(?P<event>[a-z][a-z0-9_]*)(?::(?P<head>\S+))?(?P<fields>(?: {KEY}:\S*)*)(?: detail:(?P<detail>.*))?")
HPARAM_LINE = re.compile(rf"hparam (?P<key>{KEY}):(?P<value>.*)")
# the upstream spellings train_gpt.py keeps byte for byte, rewritten into the generic form before parsing
UPSTREAM_LINES = (
    (re.compile(r"Total submission int6\+zstd: (\d+) bytes"), r"total_submission total_bytes:\1"),
    (re.compile(r"stopping_early: (\w+)(.*)"), r"stopping_early reason:\1\2"),
)
TEXT_KEYS = ("value", "path", "pattern", "sha256", "code_sha256", "source_sha256", "detail", "run_id")  # never converted to numbers
UNITS = ("ms", "s")  # `train_time:123ms` -> train_time_ms: 123.0
SCORE_KEYS = ("val_loss", "val_bpb", "train_loss")  # a non-finite value in any of them: the run failed


class LogError(ToolError):
    """A log that the tools cannot use (foreign file, truncated or failed run); the message names the file."""


@dataclass
class RunLog:
    """Everything the tools need from one log. Raw events are in `events`; derived values are properties."""

    path: Path
    events: dict[str, list[dict]] = field(default_factory=dict)  # event name -> every occurrence, in log order
    lines: dict[str, str] = field(default_factory=dict)  # event name -> text of its last line (evidence)
    unparsed: list[str] = field(default_factory=list)  # non-blank lines that are no event (source text, noise)

    def event(self, name: str) -> dict:
        """Fields of the last occurrence of an event (empty dict when absent)."""
        found = self.events.get(name)
        return found[-1] if found else {}

    # --- identity and settings ---
    @property
    def hparams(self) -> dict[str, str]:
        """Logged settings as strings, e.g. {'seed': '1337', 'ngram_mode': 'exact'}."""
        return {e["key"]: e["value"] for e in self.events.get("hparam", [])}

    @property
    def run_id(self) -> str:
        """Run id from the hparam line, else the file stem."""
        return self.hparams.get("run_id") or self.path.stem

    @property
    def seed(self) -> int | None:
        return _to_int(self.hparams.get("seed"))

    @property
    def world_size(self) -> int | None:
        return self.runtime.get("world_size")

    @property
    def runtime(self) -> dict:
        """Fields of the `runtime key:value ...` line."""
        return self.event("runtime")

    # --- training ---
    @property
    def step_lines(self) -> list[dict]:
        """Train and val step events in log order (each has step, train_time_ms, step_avg_ms, line)."""
        return self.events.get("step", [])

    def step_events(self, kind: str) -> list[dict]:
        """Step lines of one kind: 'train_step' (train_loss) or 'val_step' (val_bpb)."""
        key = "train_loss" if kind == "train_step" else "val_bpb"
        return [e for e in self.step_lines if key in e]

    @property
    def peak_memory_mib(self) -> int | None:
        """Peak device memory (allocated) on CUDA, else the peak resident set size: the largest of the phases
        (`peak_memory ... phase:train`, then `phase:eval`)."""
        peaks = [m.get("allocated_mib", m.get("rss_mib")) for m in self.events.get("peak_memory", [])]
        return max((p for p in peaks if p is not None), default=None)

    @property
    def last_progress(self) -> dict:
        """Where training stopped: the stopping_early line, else the last step line (empty before any step)."""
        return self.event("stopping_early") or (self.step_lines[-1] if self.step_lines else {})

    @property
    def steps(self) -> int | None:
        return self.last_progress.get("step")

    @property
    def step_avg_ms(self) -> float | None:
        """Average step time at the last step line."""
        return self.step_lines[-1]["step_avg_ms"] if self.step_lines else None

    @property
    def train_time_ms(self) -> float | None:
        return self.last_progress.get("train_time_ms")

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
        return self.event(f"diag_eval_{which}").get("val_bpb")

    @property
    def roundtrip_exact(self) -> dict:
        """final_int6_zstd_roundtrip_exact fields (val_loss, val_bpb); empty when truncated."""
        return self.event("final_int6_zstd_roundtrip_exact")

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
        return self.event("code_bytes").get("code_bytes")

    @property
    def code_sha256(self) -> str | None:
        return self.event("code_bytes").get("code_sha256")

    @property
    def source_sha256(self) -> str | None:
        """sha256 of the readable source (= code_sha256 for a run of the readable file, absent in older logs)."""
        return self.event("code_bytes").get("source_sha256")

    @property
    def code_form(self) -> str | None:
        """`readable` or `packed`: which form of train_gpt.py ran (absent in older logs)."""
        return self.event("code_bytes").get("code")

    @property
    def post_training_ms(self) -> float | None:
        """Export + evaluation time from `post_training_time:`."""
        return self.event("post_training_time").get("post_training_time_ms")


def _to_int(text) -> int | None:
    """int(text) or None for missing/non-integer text."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _field(key: str, text: str) -> dict:
    """One `key:value` as typed fields: numbers, `N/M` counters (key, key_of), `123ms`/`1.5s` (key_ms, key_s)."""
    if key in TEXT_KEYS:
        return {key: text}
    if re.fullmatch(INT, text):
        return {key: int(text)}
    if re.fullmatch(NUM, text):
        return {key: float(text)}
    counter = re.fullmatch(r"(\d+)/(\d+)", text)
    if counter:
        return {key: int(counter[1]), f"{key}_of": int(counter[2])}
    for unit in UNITS:
        if text.endswith(unit) and re.fullmatch(NUM, text[:-len(unit)]):
            return {f"{key}_{unit}": float(text[:-len(unit)])}
    return {key: text}


def match_line(line: str) -> tuple[str, dict] | None:
    """(event name, fields) for a log line, or None when the line is not an event."""
    text = line.rstrip()
    for pattern, generic in UPSTREAM_LINES:
        text = pattern.sub(generic, text) if pattern.fullmatch(text) else text
    hparam = HPARAM_LINE.fullmatch(text)
    if hparam:
        return "hparam", hparam.groupdict()
    m = EVENT_LINE.fullmatch(text)
    if m is None or not (m["head"] or m["fields"] or m["detail"] is not None):
        return None
    fields = _field(m["event"], m["head"]) if m["head"] else {}
    for token in m["fields"].split():
        fields.update(_field(*token.split(":", 1)))
    if m["detail"] is not None:
        fields["detail"] = m["detail"]
    return m["event"], fields


def parse_text(text: str, path: Path | str = "<text>") -> RunLog:
    """Parse log text into a RunLog (no completeness checks)."""
    run = RunLog(path=Path(path))
    for line in text.splitlines():
        hit = match_line(line)
        if hit is None:
            if line.strip():
                run.unparsed.append(line)
            continue
        name, fields = hit
        run.events.setdefault(name, []).append(dict(fields, line=line.rstrip()))
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
    if run.event("run_failed"):
        return f"the run failed ({run.lines['run_failed']})"
    bad = non_finite_line(run)
    if bad:
        return f"non-finite score, the run failed ({bad})"
    if not run.roundtrip_exact:
        return f"truncated log (no 'final_int6_zstd_roundtrip_exact' line); last event: {_last_event(run)}"
    wants_ngram = run.hparams.get("ngram_enabled", "1") == "1"
    if wants_ngram and not (run.ngram_exact or run.event("ngram_hashed_unnormalized_exact")):
        return "truncated log (no n-gram score: stopped during the n-gram eval)"
    if run.post_training_ms is None:
        return "truncated log (no 'post_training_time' line)"
    return None


def non_finite_line(run: RunLog) -> str | None:
    """The first line with a NaN or infinite loss or bpb (a diverged run, broken weights); None when all are finite."""
    for found in run.events.values():
        for e in found:
            if any(isinstance(e.get(k), float) and not math.isfinite(e[k]) for k in SCORE_KEYS):
                return e["line"]
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
        print(json.dumps(toolkit.json_safe(result), indent=2), flush=True)
        return
    print(text, flush=True)
    if json_dest:
        toolkit.check_writable(json_dest)  # a missing folder is an error, not created
        try:
            toolkit.write_file_atomic(json_dest, (json.dumps(toolkit.json_safe(result), indent=2) + "\n").encode())
        except OSError as exc:
            raise ToolError(f"--json {json_dest}: cannot write ({exc.strerror or exc})") from None


cli_parser = toolkit.cli_parser  # the tools' ArgumentParser: one-line errors, exit 2


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
