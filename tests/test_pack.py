"""The packed train_gpt.py: deterministic, reversible, importable, and counted as the file that runs; tools/pack.py.
(The packed-vs-readable run equality is tests/test_end_to_end.py::test_packed_script_runs_exactly_as_the_readable_one.)
Run: python3 -m pytest tests/test_pack.py"""
import dataclasses
import hashlib
import importlib.util
import sys
import traceback

import pytest

import pack as pack_tool  # tools/pack.py (conftest puts tools/ on sys.path)
import train_gpt as tg
from conftest import ROOT, one_error_line

SOURCE = (ROOT / "train_gpt.py").read_bytes().decode("utf-8")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_pack_is_deterministic_and_unpack_gives_the_source_back_byte_for_byte():
    packed = tg.pack_source(SOURCE)
    assert tg.pack_source(SOURCE) == packed and packed.isascii()
    assert tg.unpack_source(packed) == SOURCE
    tricky = "# -*- coding: utf-8 -*-\r\nx = '…'\r\n\ttabs and trailing spaces   \n\x0c\nno final newline"
    assert tg.unpack_source(tg.pack_source(tricky)) == tricky  # CRLF, non-ASCII, form feed survive unchanged
    assert hashlib.sha256(SOURCE.encode()).hexdigest() in packed.splitlines()[0]


def test_todays_script_packs_under_60_kb():
    assert len(tg.pack_source(SOURCE).encode("utf-8")) <= 60_000  # the counted-code budget of a record


def test_unpack_refuses_what_pack_did_not_write():
    with pytest.raises(ValueError, match="not a packed train_gpt.py"):
        tg.unpack_source(SOURCE)


def test_packed_module_is_importable_and_counts_its_own_bytes(tmp_path, capsys):
    path = tmp_path / "train_gpt.py"
    path.write_text(tg.pack_source(SOURCE), encoding="utf-8")
    packed = load_module(path, "train_gpt_packed")
    assert capsys.readouterr() == ("", "")  # importing does nothing
    assert packed.__doc__ == tg.__doc__
    assert dataclasses.asdict(packed.Hyperparameters()) == dataclasses.asdict(tg.Hyperparameters())
    code = packed.code_identity()
    data = path.read_bytes()
    assert code == tg.code_identity(str(path))
    assert (code.packed, code.form, code.code_bytes, code.packed_bytes) == (True, "packed", len(data), len(data))
    assert code.code_sha256 == hashlib.sha256(data).hexdigest() != code.source_sha256
    assert code.source == SOURCE and code.source_sha256 == hashlib.sha256(SOURCE.encode()).hexdigest()
    readable = tg.code_identity()
    assert (readable.packed, readable.form, readable.code_bytes) == (False, "readable", len(SOURCE.encode()))
    assert readable.code_sha256 == readable.source_sha256 == code.source_sha256 and readable.packed_bytes == len(data)


def test_tracebacks_of_the_packed_file_quote_the_readable_source(tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text(tg.pack_source(SOURCE), encoding="utf-8")
    packed = load_module(path, "train_gpt_packed_tb")
    try:
        packed.unpack_source("not packed")
    except ValueError:
        text = traceback.format_exc()
    assert f'File "{path}", line ' in text and 'raise ValueError("not a packed train_gpt.py' in text


def test_pack_tool_writes_the_same_bytes_and_reverses_them(tmp_path, capsys):
    assert pack_tool.main(["pack", str(ROOT / "train_gpt.py"), "-o", str(tmp_path / "a" / "train_gpt.py")]) == 0
    out = capsys.readouterr().out
    packed = (tmp_path / "a" / "train_gpt.py").read_bytes()
    assert packed == tg.pack_source(SOURCE).encode()
    assert f"packed_bytes:{len(packed)} " in out and f"source_bytes:{len(SOURCE.encode())} " in out
    assert pack_tool.main(["pack", str(ROOT / "train_gpt.py"), "-o", str(tmp_path / "b.py")]) == 0
    assert (tmp_path / "b.py").read_bytes() == packed  # deterministic
    assert pack_tool.main(["unpack", str(tmp_path / "b.py"), "-o", str(tmp_path / "readable.py")]) == 0
    assert (tmp_path / "readable.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()


@pytest.mark.parametrize("case", ["pack_packed", "unpack_readable", "overwrite_input", "corrupt", "missing"])
def test_pack_tool_user_errors_exit_2_in_one_line(tmp_path, capsys, case):
    packed = tmp_path / "p.py"
    packed.write_text(tg.pack_source(SOURCE))
    readable = tmp_path / "r.py"
    readable.write_text(SOURCE)
    corrupt = tmp_path / "c.py"
    corrupt.write_text(tg.pack_source(SOURCE).replace('b85decode("', 'b85decode("~~~~~', 1))
    args, expected = {"pack_packed": (("pack", packed, "-o", tmp_path / "o.py"), "already packed"),
                      "unpack_readable": (("unpack", readable, "-o", tmp_path / "o.py"), "not a packed"),
                      "overwrite_input": (("pack", readable, "-o", readable), "would overwrite the input"),
                      "corrupt": (("unpack", corrupt, "-o", tmp_path / "o.py"), "cannot be decoded"),
                      "missing": (("pack", tmp_path / "absent.py", "-o", tmp_path / "o.py"), "cannot read")}[case]
    assert pack_tool.main(list(map(str, args))) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "o.py").exists() and readable.read_text() == SOURCE


def test_packed_model_compiles_whole_graph(tmp_path, tiny):
    """torch.compile(fullgraph=True) traces the functions the packed file exec'd (their source is in linecache)."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "train_gpt.py"
    path.write_text(tg.pack_source(SOURCE), encoding="utf-8")
    packed = load_module(path, "train_gpt_packed_compile")
    h = packed.Hyperparameters(**dataclasses.asdict(tiny()))
    torch.manual_seed(0)
    model = packed.build_model(h, packed.single_process_runtime())
    x = torch.randint(0, h.vocab_size, (2, h.train_seq_len))
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(x, x), model(x, x))
