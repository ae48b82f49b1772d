"""The narrow interface: tests/, tools/ and data/ use only the names train_gpt.py lists in `__all__` (and the
attributes of what those return), so the script's inside can change without breaking them. A private name is
allowed only where a test pins a private contract and says why on the same line (`# pinned: <why>`), and only the
names in PINNED. Run: python3 -m pytest tests/test_public_api.py"""
import ast
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT

PINNED = {  # private name -> the contract a test pins through it
    "_row_quantile": "bit-exact equality with torch.quantile: the QAT and export grids depend on it",
    "LSM_GROWTH": "the n-gram tables' sorted runs grow geometrically (the cost bound of an update)",
    "host_to_device": "the n-gram audit moves its positions to the GPU in one copy per batch (no CPU-visible effect)",
    "ATTENTION_CANDIDATES": "the shipped FA3/FA4 loaders, which only a CUDA device reaches (probed here with fakes)",
    "top_values_needed": "the top-k of each row that _row_quantile's bit-exact quantile needs",
    "gptq_quantize_matrix": "GPTQ's error feedback on a Hessian the test chooses (calibration cannot)",
    "GPTQQuantizer": "the per-matrix quantizer and its fallbacks on a Hessian the test chooses",
    "BANK_LAYOUT": "the banks' unbanked matrix names are the reference's state-dict keys (artifact compatibility)",
    "bank_slice_names": "the same names, per bank",
    "unbank_state": "the artifact holds the reference's unbanked state dict; rebank_state inverts it",
    "rebank_state": "the inverse of unbank_state",
    "autocast": "CUDA's bf16 autocast, simulated on the CPU (the one switch training and evaluation use)",
    "ARTIFACT_RAW_LIMIT_BYTES": "the decoded-size bound (1 GiB): tests lower it to reach it",
}
MODULE_DUNDERS = {"__file__", "__name__", "__all__", "__doc__"}
FILES = sorted(p for folder in ("tests", "tools", "data") for p in (ROOT / folder).glob("*.py"))


def script_references(path: Path):
    """(line, name) of every use of a train_gpt attribute in a file: `import train_gpt as X`, or X assigned from
    sys.modules["train_gpt"] or importlib.import_module("train_gpt"), then X.name,
    getattr/setattr/hasattr(X, "name"), monkeypatch.setattr(X, "name") and mock.patch.object(X, "name"); the string
    form "train_gpt.name" (monkeypatch.setattr, mock.patch); and `from train_gpt import name`. The suite's fixture
    named `tg` is the module too. (A test that loads the file under another name, e.g. the packed form, is about
    that loading.)"""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {"train_gpt", "tg"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "train_gpt"}
        elif isinstance(node, ast.Assign) and any(isinstance(c, ast.Constant) and c.value == "train_gpt" for c in
                                                  ast.walk(node.value)) and (
                "sys.modules" in ast.unparse(node.value) or "import_module" in ast.unparse(node.value)):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "train_gpt":
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield node.lineno, node.attr
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr in (
                "train_gpt", "tg"):  # the script through a tool's module: preflight.tg.name
            yield node.lineno, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and len(node.args) >= 2
              and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) in (
                  "getattr", "setattr", "hasattr", "delattr", "object")  # "object": mock.patch.object
              and (isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
                   or isinstance(node.args[0], ast.Attribute) and node.args[0].attr in ("train_gpt", "tg"))
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node.lineno, node.args[1].value
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str) and node.args[0].value.startswith("train_gpt."):
            name = node.args[0].value.split(".")[1]  # monkeypatch.setattr("train_gpt.x", ...), mock.patch("...")
            if name.isidentifier():
                yield node.lineno, name


def test_every_public_name_exists_once():
    assert len(set(tg.__all__)) == len(tg.__all__)
    assert [n for n in tg.__all__ if not hasattr(tg, n)] == []


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_tests_tools_and_data_use_only_public_names(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    public = set(tg.__all__) | MODULE_DUNDERS
    wrong = [f"{path.name}:{line}: {name}" for line, name in sorted(set(script_references(path)))
             if name not in public and not (name in PINNED and "# pinned: " in lines[line - 1])]
    assert wrong == [], "use a name of train_gpt.__all__ (or pin a private contract, see PINNED): " + ", ".join(wrong)


def test_the_checker_sees_every_way_of_reaching_into_the_script(tmp_path):
    source = tmp_path / "uses.py"
    source.write_text("import sys\nimport train_gpt as script\nfrom train_gpt import read_shard, _hidden\n"
                      "m = sys.modules['train_gpt']\nscript.GPT, m._other, script._row_quantile  # pinned: bit-exact\n"
                      "monkeypatch.setattr(script, '_patched', 1)\ngetattr(m, 'Hyperparameters')\n"
                      "import preflight\npreflight.tg._through_a_tool\nmonkeypatch.setattr(preflight.tg, '_set')\n"
                      "import importlib\ni = importlib.import_module('train_gpt')\ni._imported\n"
                      "monkeypatch.setattr('train_gpt._by_string', 1)\nmock.patch('train_gpt._mocked')\n"
                      "mock.patch.object(script, '_object')\n")
    found = sorted(name for _, name in script_references(source))
    assert found == ["GPT", "Hyperparameters", "_by_string", "_hidden", "_imported", "_mocked", "_object",
                     "_other", "_patched", "_row_quantile", "_set", "_through_a_tool", "read_shard"]
