"""Install FlashAttention-3 for the installed torch when it is missing and this machine can use it.

  python3 tools/install_flash_attn.py          # run.sh's GPU branch runs it before training

FlashAttention-3 (package flash_attn_3, module flash_attn_interface) runs on Hopper GPUs (sm_90: H100, H200) and is
the attention train_gpt.py picks there; without it training falls back to PyTorch SDPA, an estimated +15-25 ms per
step on 8xH100 (about 1,000 fewer steps in 600 s). PyTorch's own wheel index publishes one build of it, flash_attn_3
3.0.0 for Linux x86_64 and any CPython >= 3.9 (stable ABI), for torch built with CUDA 12.8 and with CUDA 13.0:

  pip install --no-cache-dir https://download.pytorch.org/whl/cu128/flash_attn_3-3.0.0-cp39-abi3-manylinux_2_28_x86_64.whl
  (cu130 for torch built with CUDA 13.0)

The tool picks the wheel that matches torch.version.cuda, installs it with this Python's pip, checks that the module
imports, and prints one line `flash_attn_3 status:<status> detail:<what it did or why it could not>`:
  already_installed  the module imports; nothing done
  installed          the wheel was installed and the module now imports
  skipped            no Hopper GPU is visible: FlashAttention-3 would not run here (nothing to do)
  unavailable        no published wheel fits (CPU torch, another CUDA build, another platform)
  failed             pip failed, or the module still does not import
Exit code 0 for the first three, 4 for the last two (the run then uses SDPA and train_gpt.py logs attention_warning).
"""
import importlib
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402

MODULE = "flash_attn_interface"
WHEEL = "https://download.pytorch.org/whl/{build}/flash_attn_3-3.0.0-cp39-abi3-manylinux_2_28_x86_64.whl"
BUILDS = {"12.8": "cu128", "13.0": "cu130"}  # torch.version.cuda -> PyTorch wheel index folder with the wheel
HOPPER = (9, 0)


def importable() -> bool:
    """flash_attn_interface imports and has flash_attn_func (the function train_gpt.py calls)."""
    importlib.invalidate_caches()
    try:
        return hasattr(importlib.import_module(MODULE), "flash_attn_func")
    except Exception:  # a broken install raises anything from ImportError to an OSError of a missing library
        return False


def facts() -> dict:
    """What decides the wheel: torch's CUDA build, the visible GPUs' compute capabilities, the platform."""
    gpus = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": [tuple(c) for c in gpus],
            "system": platform.system(), "machine": platform.machine()}


def choose_wheel(f: dict) -> tuple[str, str]:
    """(status, wheel URL) when a wheel fits, else (status, why not): status is `install`, `skipped` or
    `unavailable`."""
    if f["cuda"] is None:
        return "unavailable", f"torch {f['torch']} is a CPU build; install torch for CUDA 12.8 or 13.0 first"
    if HOPPER not in f["gpus"]:
        seen = ", ".join(sorted({f"sm_{a}{b}" for a, b in f["gpus"]})) or "no GPU visible to torch"
        return "skipped", f"FlashAttention-3 runs on Hopper (sm_90) GPUs; this machine has {seen}"
    if (f["system"], f["machine"]) != ("Linux", "x86_64"):
        return "unavailable", f"the published wheel is for Linux x86_64, this is {f['system']} {f['machine']}"
    build = BUILDS.get(f["cuda"])
    if build is None:
        return "unavailable", (f"torch {f['torch']} is built for CUDA {f['cuda']}; PyTorch's index publishes "
                               "flash_attn_3 3.0.0 for cu128 and cu130 only: install torch for one of them "
                               "(pip install torch --index-url https://download.pytorch.org/whl/cu128) or build "
                               "flash_attn_3 from source")
    return "install", WHEEL.format(build=build)


def run_pip(url: str) -> tuple[int, str]:
    """(exit code, last line of its output) of `python -m pip install --no-cache-dir <url>`."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", url], capture_output=True,
                         text=True)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode, lines[-1] if lines else ""


def report(status: str, detail: str) -> int:
    print(f"flash_attn_3 status:{status} detail:{' '.join(detail.split())}", flush=True)
    return 0 if status in ("already_installed", "installed", "skipped") else 4


@toolkit.entry()
def main(argv=None) -> int:
    toolkit.cli_parser(__doc__).parse_args(argv)
    if importable():
        return report("already_installed", f"{MODULE} imports; nothing to install")
    status, what = choose_wheel(facts())
    if status != "install":
        return report(status, what + "; training uses SDPA")
    code, last = run_pip(what)
    if code != 0:
        return report("failed", f"pip install {what} exited {code}: {last}; training uses SDPA")
    if not importable():
        return report("failed", f"installed {what} but {MODULE} does not import; training uses SDPA")
    return report("installed", f"{what}; {MODULE} imports")


if __name__ == "__main__":
    sys.exit(main())
