"""Preflight: prove that a machine is ready for a record run of train_gpt.py before paying for the run.

  python3 tools/preflight.py                                          # one device, default (record) configuration
  torchrun --standalone --nproc_per_node=8 tools/preflight.py --json preflight.json
  DEVICE=cpu NUM_LAYERS=2 ... python3 tools/preflight.py --steps 3 --warmup 1   # see README "Before you rent 8×H100"

The configuration comes from the environment exactly as for train_gpt.py (Hyperparameters.from_env), and every
measurement goes through the training script's own code: init_runtime, select_attention, build_model,
build_optimizers, train_step, BankCollectives, the evaluation engine, find_shards / read_shard, load_tokenizer.
Sections (each check ok / warn / fail with a one-line reason):

  environment   python, torch, CUDA, NCCL and driver versions; devices (model, count, memory); free disk
  attention     the backend train_gpt.py would pick (proven there: compiled with fullgraph when compiling, forward
                and backward, compared with SDPA) and why the others were skipped; SDPA on an sm_90 GPU (H100)
                fails (FlashAttention-3 missing: slower than the record) unless ACCEPT_SDPA=1
  collectives   all-reduce, reduce-scatter and all-gather of the Muon bank buffers (bf16, padded as the optimizer
                pads them), results verified, with bus bandwidth; "skipped (1 rank)" on one process
  training      --warmup untimed steps (compilation: reported apart) then --steps timed steps, QAT off then on, each
                step as train() runs it (status sync and EMA included); ms/step, tokens/s per device, MFU (formula
                in tools/bench_train.py), the steps reachable in MAX_WALLCLOCK_SECONDS next to the reference's 6,772
                steps at 88.6 ms/step on 8×H100; peak memory
  evaluation    the post-training evaluation (round trip + n-gram, TTT when on) timed through the compiled model
                on --eval-tokens validation targets and on half as many, projected to the whole split vs 600 s: the
                n-gram tables grow with the targets scored, so the cost per target is fitted as a + b·ln(targets)
                from the two sizes (b = 0 without the n-gram cache; see project_eval_seconds)
  data          shards and tokenizer found, token counts, manifest match, train tokens vs the projected run

Bus bandwidth follows the nccl-tests convention, with S the bytes of the full (padded) buffer, t the seconds per
call and n the ranks: all-reduce S/t·2(n−1)/n; reduce-scatter and all-gather S/t·(n−1)/n.
Projected steps = f·T/ms_qat + (1−f)·T/ms, T = MAX_WALLCLOCK_SECONDS, f = QAT_TIME_FRAC (0 without late QAT),
capped at ITERATIONS. Train tokens needed = steps × grad-accum × world × (micro-batch + 1), as the loader reads.

A hang (process-group start-up, a collective) becomes, after --collective-timeout / --timeout seconds, one line
naming the NCCL settings to try and exit code 4. Output: the Markdown table and a verdict line (rank 0), JSON with
--json PATH|- (the table then goes to stderr for '-'). Exit codes (tools/toolkit.py): 0 ready (warnings allowed);
4 not_ready (a check failed, or a hang); 2 a user error (bad setting, path or argument), reported in one line.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
import logparse  # noqa: E402
import toolkit  # noqa: E402

SECTIONS = ("environment", "attention", "collectives", "training", "evaluation", "data")
REFERENCE_STEPS, REFERENCE_MS_PER_STEP = 6772, 88.6  # the reference record on 8×H100 (600 s training cap)
EVAL_BUDGET_S = 600.0  # post-training evaluation limit of the challenge
FINEWEB_VAL_TARGETS = 62_021_632  # FineWeb sp1024 validation split; used for projections when no val shards exist
MIN_FREE_DISK_GIB = 20.0
MEMORY_WARN_FRACTION = 0.9
NCCL_HINT = ("set NCCL_DEBUG=INFO to see where it stops, then try NCCL_P2P_DISABLE=1, NCCL_IB_DISABLE=1 or "
             "NCCL_SOCKET_IFNAME=<the interface the ranks share>")


class Check(NamedTuple):
    section: str
    name: str
    status: str  # ok | warn | fail
    reason: str
    figures: dict


@dataclass
class Preflight:
    """Everything the sections share: settings, runtime, results so far."""
    args: argparse.Namespace
    h: tg.Hyperparameters
    rt: tg.Runtime  # with its attention backend once check_attention found one
    checks: list = field(default_factory=list)
    rig: object = None
    train_figures: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def add(self, section: str, name: str, status: str, reason: str, **figures) -> None:
        self.checks.append(Check(section, name, status, reason, figures))


def one_line(e: BaseException) -> str:
    """Type and message on one line, whole and of the exception itself (a check's reason may list several causes;
    an error raised while another check's error was being handled must not report that one)."""
    text = toolkit.one_line(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------------
# Watchdog: a hang becomes a message and exit code 4 (gloo and NCCL alike)
# ----------------------------------------------------------------------------------------------------------------


def _exit_on_timeout(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    print("preflight verdict:not_ready reason:timeout", flush=True)
    os._exit(toolkit.EXIT_FAILED)


@contextlib.contextmanager
def watchdog(seconds: float, what: str, on_timeout=_exit_on_timeout):
    """Run the body; if it has not finished after `seconds`, call on_timeout(message naming NCCL settings)."""
    rank = os.environ.get("RANK", "0")

    def fire():
        on_timeout(f"preflight: {what} did not finish within {seconds:g} s on rank {rank} (a rank or a collective "
                   f"is hanging); {NCCL_HINT}")

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check_environment(pf: Preflight) -> None:
    cuda_ok = torch.cuda.is_available()
    nccl = torch.cuda.nccl.version() if cuda_ok else "-"
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    driver = driver_version()
    versions = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda or "-",
                    nccl=nccl, driver=driver or "-")
    pf.add("environment", "versions", "ok", " ".join(f"{k} {v}" for k, v in versions.items()), **versions)
    _check_devices(pf, driver)
    free_gib = shutil.disk_usage(os.getcwd()).free / 2**30
    low = free_gib < MIN_FREE_DISK_GIB
    pf.add("environment", "disk", "warn" if low else "ok",
           f"{free_gib:.1f} GiB free in {os.getcwd()}" + (f" (< {MIN_FREE_DISK_GIB:g} GiB: FineWeb shards, logs "
                                                          "and artifacts may not fit)" if low else ""),
           free_gib=free_gib)


def _check_devices(pf: Preflight, driver: str | None) -> None:
    rt = pf.rt
    if not rt.is_cuda:
        why = (f"driver {driver} is installed but torch {torch.__version__} sees no CUDA device (CPU wheel or a "
               "torch/driver CUDA mismatch)") if driver else "no CUDA device"
        pf.add("environment", "devices", "warn", f"{why}: CPU only (tests and demos, not a record run)",
               count=0, world_size=rt.world_size)
        return
    props = torch.cuda.get_device_properties(rt.device)
    count, mem_gib = torch.cuda.device_count(), props.total_memory / 2**30
    pf.add("environment", "devices", "ok", f"{count} × {props.name} ({mem_gib:.1f} GiB each), world size "
           f"{rt.world_size}", count=count, name=props.name, memory_gib=mem_gib, world_size=rt.world_size)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def check_attention(pf: Preflight, candidates=None) -> None:
    """The training script's own choice; `candidates` replaces its candidate list (tests inject broken ones)."""
    extra = {} if candidates is None else {"candidates": candidates}
    try:
        pf.rt = tg.with_attention(pf.rt, pf.h, **extra)
    except tg.UserError as e:  # no candidate works: the message names each reason and the fix
        pf.add("attention", "backend", "fail", one_line(e))
        return
    rt, choice = pf.rt, pf.rt.attention
    how = "compiled (fullgraph) forward + backward" if rt.use_compile else "eager forward + backward (COMPILE off)"
    skipped = "; ".join(f"{name}: {why}" for name, why in choice.skipped) or "none"
    slow = rt.is_cuda and choice.name == "sdpa"
    missed = tg.sdpa_on_hopper(rt)  # FA3 would run there
    status = "fail" if missed and not pf.h.accept_sdpa else "warn" if slow else "ok"
    why = (f" ({tg.SDPA_ON_HOPPER}{'; accepted: ACCEPT_SDPA=1' if pf.h.accept_sdpa else ''})" if missed
           else " (no FlashAttention: slower than the record)" if slow else "")
    pf.add("attention", "backend", status, f"{choice.name}: {how} matches SDPA{why}; skipped: {skipped}",
           backend=choice.name, compile=pf.rt.use_compile, skipped=dict(choice.skipped))


# ----------------------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------------------


def bus_bandwidth(kind: str, nbytes: int, seconds: float, world: int) -> float:
    """Bytes/s on the bus (nccl-tests convention): all-reduce moves 2(n-1)/n of the buffer, the others (n-1)/n."""
    factor = 2.0 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
    return nbytes / seconds * factor


def _timed(rt: tg.Runtime, fn, iters: int) -> float:
    """Seconds per call of fn (one untimed call first), all ranks started together."""
    fn()
    dist.barrier()
    tg.synchronize(rt)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    tg.synchronize(rt)
    return (time.perf_counter() - t0) / iters


def _bank_buffers(pf: Preflight) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(full, shard) bf16 pairs shaped like the optimizer's padded bank buffers (full) and one rank's share."""
    pairs = []
    for b in pf.rig.opt.muon.banks:
        full = torch.zeros_like(b.grad)
        pairs.append((full, torch.zeros_like(full[:full.shape[0] // pf.rt.world_size])))
    return pairs


def _collective_calls(pairs, comm):
    """The three collectives over every bank, each waiting on its handles as the optimizer does."""
    def all_reduce():
        for full, _ in pairs:
            dist.all_reduce(full, op=dist.ReduceOp.SUM)

    def reduce_scatter():
        for work in [comm.reduce_scatter(shard, full) for full, shard in pairs]:
            work.wait()

    def all_gather():
        for work in [comm.all_gather(full, shard) for full, shard in pairs]:
            work.wait()
    return {"all_reduce": all_reduce, "reduce_scatter": reduce_scatter, "all_gather": all_gather}


def _verified(kind: str, pairs, world: int) -> bool:
    """After one call from inputs rank + 1: sums are world(world+1)/2 (exact in bf16), gathered blocks 1..world."""
    total = world * (world + 1) // 2
    if kind == "all_reduce":
        return all(bool((full == total).all()) for full, _ in pairs)
    if kind == "reduce_scatter":
        return all(bool((shard == total).all()) for _, shard in pairs)
    blocks = torch.arange(1, world + 1, dtype=torch.bfloat16, device=pairs[0][0].device)[:, None]
    return all(bool((full.view(world, -1) == blocks).all()) for full, _ in pairs)


def check_collectives(pf: Preflight) -> None:
    rt, args = pf.rt, pf.args
    if not rt.distributed:
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            pf.add("collectives", kind, "ok", "skipped (1 rank)")
        return
    if pf.rig is None:
        pf.add("collectives", "banks", "fail", "not run: the model could not be built (see attention)")
        return
    with watchdog(args.collective_timeout, "the collectives section"):
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            _one_collective(pf, kind)


def _one_collective(pf: Preflight, kind: str) -> None:
    """Time `kind` over every bank buffer, then run it once from known inputs and verify the result."""
    rt = pf.rt
    pairs = _bank_buffers(pf)
    nbytes = sum(full.numel() * full.element_size() for full, _ in pairs)
    fn = _collective_calls(pairs, pf.rig.opt.muon.comm)[kind]  # the optimizer's own bank collectives
    seconds = _timed(rt, fn, pf.args.collective_iters)
    for full, shard in pairs:
        full.fill_(float(rt.rank + 1))
        shard.fill_(float(rt.rank + 1))
    fn()
    ok = _verified(kind, pairs, rt.world_size)
    bw = bus_bandwidth(kind, nbytes, seconds, rt.world_size)
    via = "dist.all_reduce" if kind == "all_reduce" else f"BankCollectives.{kind}"
    reason = (f"{len(pairs)} bf16 banks, {nbytes / 2**20:.1f} MiB via {via}: {1000 * seconds:.2f} ms, "
              f"bus {bw / 1e9:.2f} GB/s" + ("" if ok else "; WRONG RESULT (sums or gathered blocks differ)"))
    pf.add("collectives", kind, "ok" if ok else "fail", reason, bytes=nbytes, ms=1000 * seconds, bus_bytes_per_s=bw)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def projected_steps(h: tg.Hyperparameters, ms_plain: float, ms_qat: float) -> int:
    """Steps that fit MAX_WALLCLOCK_SECONDS: late QAT runs the last QAT_TIME_FRAC of the time; capped at ITERATIONS."""
    if h.max_wallclock_seconds <= 0:
        return h.iterations
    f = h.qat_time_frac if h.qat_enabled else 0.0
    cap_ms = 1000.0 * h.max_wallclock_seconds
    return min(h.iterations, int((1.0 - f) * cap_ms / ms_plain + f * cap_ms / ms_qat))


def _step_reason(fig: dict, use_compile: bool) -> str:
    mfu = "n/a (no peak for this device)" if fig["mfu"] is None else f"{100 * fig['mfu']:.1f}%"
    compiled = f"compile ≈ {fig['compile_s']:.1f} s" if use_compile else "COMPILE off"
    return (f"{fig['ms_per_step']:,.1f} ms/step, {fig['tokens_per_s_per_device']:,.0f} tokens/s/device, MFU {mfu}; "
            f"warm-up {fig['warmup_steps']} steps {fig['warmup_s']:.1f} s ({compiled})")


def check_training(pf: Preflight) -> None:
    if pf.rig is None:
        pf.add("training", "steps", "fail", "not run: the model could not be built (see attention)")
        return
    h, rt, args = pf.h, pf.rt, pf.args
    peak = bench_train.peak_flops_for(rt.device, args.peak_flops)
    for qat in (False, True):
        pf.rig.base_model.qat_active = qat
        fig = bench_train.time_training(pf.rig, h, rt, args.warmup, args.steps, peak)
        pf.train_figures["qat" if qat else "plain"] = fig
        finite = math.isfinite(fig["final_loss"])
        reason = ("QAT on: " if qat else "QAT off: ") + _step_reason(fig, pf.rt.use_compile)
        if not finite:
            reason += f"; non-finite loss {fig['final_loss']}: lower the learning rates or check the data"
        pf.add("training", "steps_qat" if qat else "steps", "ok" if finite else "fail", reason, **fig)
    pf.rig.base_model.qat_active = False
    _check_projection(pf)
    _check_memory(pf)


def _check_projection(pf: Preflight) -> None:
    h, plain, qat = pf.h, pf.train_figures["plain"], pf.train_figures["qat"]
    steps = projected_steps(h, plain["ms_per_step"], qat["ms_per_step"])
    pf.data["projected_steps"] = steps
    capped = " (capped by ITERATIONS)" if steps == h.iterations else ""
    fewer = steps < REFERENCE_STEPS
    pf.add("training", "projection", "warn" if fewer else "ok",
           f"{steps:,} steps{capped} in MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} on {pf.rt.world_size} "
           f"device(s), vs the reference's {REFERENCE_STEPS:,} at {REFERENCE_MS_PER_STEP} ms/step on 8×H100"
           + (": fewer steps than the record had" if fewer else ""),
           projected_steps=steps, reference_steps=REFERENCE_STEPS, reference_ms_per_step=REFERENCE_MS_PER_STEP)


def _check_memory(pf: Preflight) -> None:
    rt, figs = pf.rt, list(pf.train_figures.values())
    if not rt.is_cuda:
        rss = max(f["peak_memory_rss_mib"] for f in figs)
        pf.add("training", "memory", "ok", f"peak RSS {rss:,.0f} MiB (process)", peak_memory_rss_mib=rss)
        return
    alloc = max(f["peak_memory_allocated_mib"] for f in figs)
    reserved = max(f["peak_memory_reserved_mib"] for f in figs)
    total = torch.cuda.get_device_properties(rt.device).total_memory / 2**20
    tight = reserved > MEMORY_WARN_FRACTION * total
    pf.add("training", "memory", "warn" if tight else "ok",
           f"peak {alloc:,.0f} MiB allocated, {reserved:,.0f} MiB reserved of {total:,.0f} MiB"
           + (" (little headroom)" if tight else ""),
           peak_memory_allocated_mib=alloc, peak_memory_reserved_mib=reserved, device_memory_mib=total)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def eval_slice(pf: Preflight, targets: int) -> tg.ValData:
    """The first `targets` validation targets with real byte tables, or uniform random tokens with one byte each
    when the data is missing (the timing does not depend on the token values much)."""
    h = pf.h
    with contextlib.suppress(ValueError), contextlib.redirect_stdout(io.StringIO()):  # tg.UserError: no shards,
        return tg.load_val_data(dataclasses.replace(h, val_max_tokens=targets), tg.load_tokenizer(h))  # tokenizer
    n = max(targets // h.eval_seq_len, 1) * h.eval_seq_len
    tokens = torch.randint(0, h.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(h.seed))
    ones = torch.ones(h.vocab_size, dtype=torch.int16)
    no = torch.zeros(h.vocab_size, dtype=torch.bool)
    return tg.ValData(tokens, tg.ByteTables(ones, no, no))


def _timed_evals(pf: Preflight, raw_model, val: tg.ValData) -> dict:
    """Seconds of each post-training pass on `val`, as evaluate_artifact runs them: the one pass (round trip +
    n-gram from the same logits) on the compiled model, then TTT (TTT_ENABLED=1) on a copy. The time is the one each
    eval measures and reports itself; their log lines are swallowed."""
    h, rt = pf.h, pf.rt
    compiled = tg.compile_model(raw_model, pf.rt.use_compile)
    passes = {"one_pass": lambda: tg.roundtrip_eval(compiled, val, h, rt)}
    if h.ttt_enabled:
        passes["ttt"] = lambda: tg.ttt_eval(raw_model, val, h, rt, lambda m: tg.compile_model(m, pf.rt.use_compile))
    with contextlib.redirect_stdout(io.StringIO()):
        return {name: run()["model"].time_ms / 1000.0 for name, run in passes.items()}


def check_evaluation(pf: Preflight) -> None:
    if pf.rig is None:
        pf.add("evaluation", "throughput", "fail", "not run: the model could not be built (see attention)")
        return
    h = pf.h
    model = tg.build_model(h, pf.rt)  # a fresh model with the trained weights, as after export
    model.load_state_dict(pf.rig.base_model.state_dict(), strict=True)
    t0 = time.perf_counter()
    _timed_evals(pf, model, eval_slice(pf, 2 * (h.ttt_chunk_tokens if h.ttt_enabled else h.eval_seq_len)))  # compiles
    compile_s = time.perf_counter() - t0
    n_large = min(pf.args.eval_tokens, pf.data.get("val_targets") or pf.args.eval_tokens)
    small, large = eval_slice(pf, n_large // 2), eval_slice(pf, n_large)
    timed = {val.num_targets: _timed_evals(pf, model, val) for val in (small, large)}
    (n_small, seconds_small), (n, seconds) = sorted(timed.items())[0], sorted(timed.items())[-1]
    what = "round trip + n-gram" if h.ngram_enabled else "round trip"
    rates = ", ".join(f"{k} {n / s:,.0f}" for k, s in seconds.items())
    pf.add("evaluation", "throughput", "ok", f"{n:,} targets on {pf.rt.world_size} device(s), one pass = {what}: "
           f"{rates} tokens/s (compile + warm-up {compile_s:.1f} s)", targets=n, seconds=seconds, compile_s=compile_s,
           targets_small=n_small, seconds_small=seconds_small)
    _check_eval_projection(pf, {k: ((n_small, seconds_small[k]), (n, s)) for k, s in seconds.items()}, compile_s)


def project_eval_seconds(small: tuple[int, float], large: tuple[int, float], total: int, grows: bool) -> float:
    """Seconds of a pass over `total` targets from two timed passes (targets, seconds). The cost of a target is
    a + b·ln(m), m the targets already in the n-gram tables (lookups in and merges into sorted runs grow with the
    log of their size), so a pass over n targets averages c(n) = a + b·(ln n − 1) per target; two sizes give
    b = (c(n2) − c(n1)) / ln(n2/n1) (clamped at 0: timing noise) and c(total) = c(n2) + b·ln(total/n2).
    grows=False (no n-gram tables): b = 0, linear."""
    (n1, t1), (n2, t2) = small, large
    b = max((t2 / n2 - t1 / n1) / math.log(n2 / n1), 0.0) if grows and n2 > n1 else 0.0
    return total * (t2 / n2 + b * math.log(max(total, n2) / n2))


def _check_eval_projection(pf: Preflight, timings: dict, compile_s: float) -> None:
    """timings: pass name -> ((targets, seconds) of the small slice, (targets, seconds) of the large one)."""
    total = pf.data.get("val_targets") or FINEWEB_VAL_TARGETS
    source = "the val shards" if pf.data.get("val_targets") else "FineWeb's split (no val shards here)"
    grows = pf.h.ngram_enabled
    passes = {k: project_eval_seconds(*pair, total, grows) for k, pair in timings.items()}
    linear = compile_s + sum(total * large[1] / large[0] for _, large in timings.values())
    seconds = compile_s + sum(passes.values())
    parts = " + ".join(f"{k} {s:.0f} s" for k, s in passes.items())
    ttt = "" if pf.h.ttt_enabled else "; TTT off"
    how = (f"n-gram tables growing: fitted a + b·ln(targets) per target from 2 slice sizes, {linear:,.0f} s if linear"
           if grows else "linear from the slice")
    over = seconds > EVAL_BUDGET_S
    pf.add("evaluation", "projection", "fail" if over else "ok",
           f"{seconds:,.0f} s for {total:,} targets ({source}): compile {compile_s:.0f} s + {parts}{ttt}; budget "
           f"{EVAL_BUDGET_S:.0f} s ({how}; export not included)" + (": over budget" if over else ""),
           projected_s=seconds, projected_linear_s=linear, val_targets=total, budget_s=EVAL_BUDGET_S)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def check_data(pf: Preflight) -> None:
    h = pf.h
    try:
        train, val = tg.find_shards(h.data_path, "train"), tg.find_shards(h.data_path, "val")
        val_tokens = sum(tg.read_shard(f, h.vocab_size).size for f in val)  # full checks of what evaluation reads
        tg.read_shard(train[0], h.vocab_size)  # and of what step 1 reads; the other train shards' headers only:
        train_tokens = sum(map(tg.shard_token_count, train))
    except tg.UserError as e:  # no shards, or a shard that is not valid
        pf.add("data", "shards", "fail", one_line(e))
        _check_tokenizer(pf)
        return
    usable = (val_tokens - 1) // h.eval_seq_len * h.eval_seq_len
    pf.data.update(train_tokens=train_tokens, train_shards=len(train),
                   val_targets=min(usable, h.val_max_tokens) if h.val_max_tokens > 0 else usable)
    pf.add("data", "shards", "ok", f"{len(train)} train shards ({train_tokens:,} tokens), {len(val)} val shards "
           f"({val_tokens:,} tokens) in {h.data_path}", train_shards=len(train), train_tokens=train_tokens,
           val_shards=len(val), val_tokens=val_tokens)
    _check_tokenizer(pf)
    _check_manifest(pf, train, val, {"train": train_tokens, "val": val_tokens})


def _check_tokenizer(pf: Preflight) -> None:
    try:
        sp = tg.load_tokenizer(pf.h)
    except tg.UserError as e:  # missing, not a model, wrong vocab, or not the manifest's tokenizer
        pf.add("data", "tokenizer", "fail", one_line(e))
        return
    pf.add("data", "tokenizer", "ok", f"{pf.h.tokenizer_path}: {sp.vocab_size()} pieces = VOCAB_SIZE" + (
        ", sha256 = the manifest's" if os.path.isfile(os.path.join(pf.h.data_path, tg.DATASET_MANIFEST)) else ""))


def _check_manifest(pf: Preflight, train: list[str], val: list[str], counts: dict) -> None:
    """The manifest data/make_dataset.py writes beside the shards vs what is on disk: vocab size, and per split the
    shard names and token count (the tokenizer's sha256 is load_tokenizer's check)."""
    h = pf.h
    path = os.path.join(h.data_path, tg.DATASET_MANIFEST)
    if not os.path.isfile(path):
        pf.add("data", "manifest", "warn", f"no {tg.DATASET_MANIFEST} beside the shards: the tokenizer and token "
               "counts cannot be checked against what the shards were made with")
        return
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    actual = {"vocab_size": h.vocab_size}
    for split, files in (("train", train), ("val", val)):
        actual[f"{split}.shards"] = [os.path.basename(p) for p in files]
        actual[f"{split}.tokens"] = counts[split]
    expected = {"vocab_size": manifest.get("vocab_size")}
    for split, rec in manifest.get("splits", {}).items():
        expected.update({f"{split}.shards": rec.get("shards"), f"{split}.tokens": rec.get("tokens")})
    bad = [f"{k}: manifest {expected.get(k)} vs {v}" for k, v in actual.items() if expected.get(k) != v]
    if bad:
        pf.add("data", "manifest", "fail", f"{path} does not match the shards: " + "; ".join(bad)
               + " (rebuild the dataset or point DATA_PATH at the folder it describes)")
    else:
        pf.add("data", "manifest", "ok", f"{path}: vocab size, shard names and token counts match")


def check_data_supply(pf: Preflight) -> None:
    """Train tokens the projected run reads (as the loader reads them) vs the tokens in the train shards."""
    h, rt, d = pf.h, pf.rt, pf.data
    if "train_tokens" not in d or "projected_steps" not in d:
        return
    per_step = h.grad_accum_steps(rt.world_size) * rt.world_size * (h.micro_batch_tokens(rt.world_size) + 1)
    need = d["projected_steps"] * per_step
    wraps = need > d["train_tokens"]
    shards = math.ceil(need / (d["train_tokens"] / d["train_shards"]))
    pf.add("data", "supply", "warn" if wraps else "ok",
           f"{d['projected_steps']:,} steps read {need:,} train tokens; the shards hold {d['train_tokens']:,}"
           + (f": the stream would wrap ({need / d['train_tokens']:.2f} epochs); get about {shards} shards "
              "(cached_challenge_fineweb.py --train-shards N)" if wraps else ""),
           tokens_needed=need, shards_needed=shards)


# ----------------------------------------------------------------------------------------------------------------
# Orchestration and report
# ----------------------------------------------------------------------------------------------------------------


def build_rig(pf: Preflight) -> None:
    """The training rig every later section measures (real train shards when present, else synthetic tokens)."""
    if pf.rt.attention is None:
        return
    synthetic = "train_tokens" not in pf.data
    pf.rig = bench_train.build_rig(pf.h, pf.rt, synthetic)
    pf.data["train_source"] = "synthetic" if synthetic else "shards"


STEPS = ((check_environment, "environment"), (check_attention, "attention"), (check_data, "data"),
         (build_rig, "training"), (check_collectives, "collectives"), (check_training, "training"),
         (check_evaluation, "evaluation"), (check_data_supply, "data"))


def run_checks(pf: Preflight) -> list[Check]:
    """Every section in dependency order; an exception fails that section with its one-line reason."""
    for fn, section in STEPS:
        try:
            fn(pf)
        except Exception as e:  # a broken section must not hide the others
            pf.add(section, fn.__name__.removeprefix("check_"), "fail", one_line(e))
    return sorted(pf.checks, key=lambda c: SECTIONS.index(c.section))


def verdict_line(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    state = "not_ready" if counts["fail"] else "ready"
    return f"preflight verdict:{state} ok:{counts['ok']} warn:{counts['warn']} fail:{counts['fail']}"


def markdown_table(checks: list[Check]) -> str:
    rows = ["| section | check | status | detail |", "| --- | --- | --- | --- |"]
    rows += [f"| {c.section} | {c.name} | {c.status} | {c.reason.replace('|', '/')} |" for c in checks]
    return "\n".join(rows)


def report_json(pf: Preflight, checks: list[Check]) -> dict:
    return {"verdict": verdict_line(checks).split()[1].split(":")[1], "world_size": pf.rt.world_size,
            "device": pf.rt.device.type, "compile": pf.rt.use_compile,
            "checks": [c._asdict() for c in checks]}


def parse_args(argv=None) -> argparse.Namespace:
    p = logparse.cli_parser(__doc__)
    count = toolkit.positive_int
    seconds = toolkit.arg_type(float, lambda v: 0 < v <= 1e9, "a number of seconds in (0, 1e9]")  # a timer's range
    p.add_argument("--steps", type=count, default=20, help="timed training steps per QAT state (default 20)")
    p.add_argument("--warmup", type=toolkit.non_negative_int, default=3,
                   help="untimed steps before each timing, compile included (3)")
    p.add_argument("--eval-tokens", type=count, default=524_288,
                   help="validation targets timed for the eval projection")
    p.add_argument("--collective-iters", type=count, default=5, help="timed calls per collective (default 5)")
    p.add_argument("--collective-timeout", type=seconds, default=120.0, help="seconds before process-group start-up "
                   "or the collectives section counts as hung (default 120)")
    p.add_argument("--timeout", type=seconds, default=900.0, help="seconds before the whole tool counts as hung")
    p.add_argument("--peak-flops", type=toolkit.positive_float, default=None,
                   help="peak FLOP/s per device for MFU (overrides table)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the checks as JSON to PATH ('-' = stdout)")
    return p.parse_args(argv)


def start(args: argparse.Namespace) -> Preflight:
    """Settings, runtime and the JSON destination, checked before minutes of measurements."""
    toolkit.check_writable(args.json)
    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.init_runtime(h)
    h.validate(rt.world_size)
    return Preflight(args, h, rt)


def finish(pf: Preflight, checks: list[Check]) -> bool:
    """Agree on failure across ranks, print (rank 0) or report this rank's failures; True when a check failed."""
    mine = any(c.status == "fail" for c in checks)
    failed = toolkit.any_rank(mine, pf.rt.device)
    if failed and not mine:
        checks.append(Check("environment", "other_ranks", "fail", "a check failed on another rank (its reason is "
                            "on that rank's stderr)", {}))
    if pf.rt.is_main:
        logparse.emit(markdown_table(checks) + "\n" + verdict_line(checks), report_json(pf, checks), pf.args.json)
    elif mine:
        for c in checks:
            if c.status == "fail":
                print(f"rank {pf.rt.rank}: {c.section} {c.name}: {c.reason}", file=sys.stderr, flush=True)
    return failed


@toolkit.entry(tg.UserError)
def preflight(argv=None) -> int:
    """Parse, start, run every check and report; returns the exit code (0 ready, 4 not_ready)."""
    args = parse_args(argv)
    with watchdog(args.timeout, "preflight"):
        with watchdog(args.collective_timeout, "process-group start-up"):
            pf = start(args)
        failed = finish(pf, run_checks(pf))
    return toolkit.EXIT_FAILED if failed else toolkit.EXIT_OK


def main(argv=None) -> int:
    tg.shutdown(preflight(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
