"""Every command in README.md's ```bash blocks works as written, run in order in a temporary copy of the repository
with CPU-sized settings from the environment (README commands set their own variables on top of these).

Skipped, and only these: commands that need the network (the FineWeb download), the bench corpus that lives outside
the repository (tools/bench_ngram_mixer.py: ../shared/bench and about an hour of CPU; tests/test_bench_ngram_mixer.py
runs the tool on the tiny corpus) or that run this test suite itself (the test command of "The two commands"). Commands written for GPUs run as written on the CPU (gloo), with one
CPU-sized change besides the settings: a `torchrun` first on PATH caps `--nproc_per_node` at 2 processes (8 ranks
would cost CI minutes and test nothing more than 2). Run: python3 -m pytest tests/test_readme_commands.py
"""
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, tiny_run_env

SKIP = {  # substring of a command -> why it cannot run here
    "cached_challenge_fineweb.py": "downloads FineWeb from the Hugging Face hub (network)",
    "pytest": "runs this test suite itself",
    "bench_ngram_mixer.py": "needs the bench corpus outside the repository (tests/test_bench_ngram_mixer.py runs it)",
}
EXPECTED_EXIT = {  # substring of a command -> the exit codes that mean it worked as documented (README's table)
    "tools/significance.py": (0, 4),  # 4 = not significant: the tiny CPU runs do not beat the record's baseline
}
CPU_SETTINGS = {  # on top of the tiny end-to-end settings: the main job's branch and an offline pip
    "MODE": "cpu", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "ITERATIONS": "6",
    "VAL_LOSS_EVERY": "0", "WARMDOWN_ITERS": "3", "TRAIN_MICRO_BATCH_TOKENS": "0",  # 0: derived from the world size
}
TORCHRUN_SHIM = """#!/usr/bin/env bash
args=()
for a in "$@"; do
  case "$a" in --nproc_per_node=*) n=${a#*=}; [ "$n" -gt 2 ] && a=--nproc_per_node=2;; esac
  args+=("$a")
done
exec python3 -m torch.distributed.run "${args[@]}"
"""
COPIED = ("train_gpt.py", "run.sh", "requirements.txt", "requirements-dev.txt", "README.md", "tools", "data")


def readme_commands() -> list[str]:
    """Command lines of the ```bash blocks, in order (comments and blank lines dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_has_the_commands_we_expect():
    commands = readme_commands()
    assert "bash run.sh" in commands and any(c.startswith("for s in") for c in commands)
    assert any("tools/make_record.py" in c for c in commands)


def test_the_readme_test_command_is_what_ci_runs():
    """README's test command (in "The two commands") runs the full tier, the pytest command of .ci/run."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip().startswith("python3 -m pytest")]
    readme = [c.split("&&")[-1].strip() for c in readme_commands() if "python3 -m pytest" in c]
    assert ci == ["python3 -m pytest --full"] and readme[:1] == ci


@pytest.mark.slow
def test_every_readme_command_works_as_written(tiny_corpus, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("datasets", "tokenizers", "__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    shim = tmp_path / "bin" / "torchrun"
    shim.parent.mkdir()
    shim.write_text(TORCHRUN_SHIM)
    shim.chmod(0o755)
    env = tiny_run_env(tiny_corpus, tmp_path, **CPU_SETTINGS)
    env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    for key in ("RUN_ID", "LOG_DIR", "ARTIFACT_PATH"):  # the commands' own defaults apply
        del env[key]
    ran = []
    for command in readme_commands():
        reason = next((why for part, why in SKIP.items() if part in command), None)
        if reason:
            continue
        out = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        expected = next((codes for part, codes in EXPECTED_EXIT.items() if part in command), (0,))
        assert out.returncode in expected, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 8, ran
    assert sorted(p.name for p in repo.glob("final_model_seed*.int6.ptz")) == [
        f"final_model_seed{s}.int6.ptz" for s in (1337, 2024, 42)]  # one artifact per seed
    assert (repo / "summary.json").is_file() and (repo / "curves.png").is_file()
    assert list((repo / "records" / "track_10min_16mb").glob("*_my_run/submission.json"))
