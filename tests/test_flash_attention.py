"""FlashAttention on a GPU we do not have, proven on the CPU with fake modules and a fake device capability:
the FA3 and FA4 loaders (fake `flash_attn_interface` / `flash_attn.cute.interface`), FA4's kernels wrapped as
torch.library custom ops so that torch.compile(fullgraph=True) traces them (a stand-in kernel that no tracer can
follow), the `attention_warning` of an H100 left on SDPA, tools/install_flash_attn.py (fake pip, fake torch CUDA
builds) and run.sh's GPU branch calling it (shims for nvidia-smi, pip and torchrun).
Run: python3 -m pytest tests/test_flash_attention.py"""
import dataclasses
import importlib
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import install_flash_attn
import train_gpt as tg
from conftest import ROOT, TINY, TINY_LAYOUT, probed_runtime, settings_env, tiny_hparams


# ------------------------------------------------------------------ a stand-in kernel pair (FlashAttention's maths)

def _expand(t, heads):
    return t.repeat_interleave(heads // t.size(2), dim=2)


def _scores(q, k):
    """Causal scaled scores [B,H,T,T] in fp32 (GQA: query head h reads kv head h // (H/Hkv))."""
    t = q.size(1)
    s = torch.einsum("bthd,bshd->bhts", q.float(), _expand(k, q.size(2)).float()) / math.sqrt(q.size(-1))
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))


def standin_fwd(q, k, v):
    """(out, lse [B,H,T]) like a FlashAttention forward; host round trip and a graph break: no tracer follows it."""
    np.asarray(q.detach().float())
    torch._dynamo.graph_break()
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError("FlashAttention only supports fp16 and bf16")
    s = _scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhts,bshd->bthd", torch.exp(s - lse[..., None]), _expand(v, q.size(2)).float())
    return out.to(q.dtype), lse


def standin_bwd(dout, q, k, v, out, lse):
    """(dq, dk, dv) from the saved output and log-sum-exp, as FlashAttention's backward computes them."""
    torch._dynamo.graph_break()
    b, t, h, d = q.shape
    group = h // k.size(2)
    p, do = torch.exp(_scores(q, k) - lse[..., None]), dout.float()
    dv = torch.einsum("bhts,bthd->bshd", p, do).reshape(b, t, k.size(2), group, d).sum(3)
    dp = torch.einsum("bthd,bshd->bhts", do, _expand(v, h).float())
    ds = p * (dp - (do * out.float()).sum(-1).transpose(1, 2)[..., None]) / math.sqrt(d)
    dq = torch.einsum("bhts,bshd->bthd", ds, _expand(k, h).float())
    dk = torch.einsum("bhts,bthd->bshd", ds, q.float()).reshape(b, t, k.size(2), group, d).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _StandinFunction(torch.autograd.Function):
    """The kernel pair as FlashAttention-4 ships it: a Python autograd.Function around the kernels."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = standin_fwd(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return standin_bwd(dout, *ctx.saved_tensors)


def raw_standin(q, k, v):
    return _StandinFunction.apply(q, k, v)


def qkv(seed=0, t=32):
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = TINY_LAYOUT
    return [torch.randn(2, t, n, head_dim, generator=g).bfloat16().requires_grad_()
            for n in (heads, kv_heads, kv_heads)]


def test_standin_kernel_pair_is_attention_with_its_gradients():
    q, k, v = qkv()
    out = raw_standin(q, k, v)
    out.float().square().sum().backward()
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = tg.sdpa_attention(*ref_in)
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.03)
    for t, r in zip((q, k, v), ref_in):
        assert (t.grad.float() - r.grad).abs().max() < 0.02 * r.grad.abs().max()


# ------------------------------------------------------------------ FA4: custom ops that torch.compile can trace

def test_fullgraph_probe_rejects_the_raw_kernel_and_accepts_it_wrapped_as_custom_ops():
    wrapped = tg.custom_attention("standin", standin_fwd, standin_bwd)
    assert tg.custom_attention("standin", standin_fwd, standin_bwd) is wrapped  # registered once per process
    candidates = (tg.AttentionCandidate("raw", lambda: raw_standin), tg.AttentionCandidate("wrapped", lambda: wrapped),
                  tg.AttentionCandidate("sdpa", lambda: tg.sdpa_attention))
    torch._dynamo.reset()
    choice = probed_runtime(candidates).attention
    assert choice.name == "wrapped" and choice.fn is wrapped
    assert [name for name, _ in choice.skipped] == ["raw"]
    assert "graph_break" in dict(choice.skipped)["raw"] or "Unsupported" in dict(choice.skipped)["raw"]
    eager = probed_runtime(candidates, use_compile=False).attention
    assert eager.name == "raw"  # fine without compile: only tracing needs the wrapping


def test_wrapped_kernel_traces_inside_the_whole_model_in_one_graph(tiny):
    h = tiny(num_heads=4, num_kv_heads=2, model_dim=64)
    wrapped = tg.custom_attention("standin", standin_fwd, standin_bwd)
    torch.manual_seed(0)
    standin = tg.AttentionCandidate("standin", lambda: wrapped)
    rt = tg.with_attention(tg.single_process_runtime(), h, candidates=(standin,))
    model = tg.build_model(h, rt)
    assert model.attention_backend == "standin"
    with torch.no_grad():
        model.qo_bank[h.num_layers:].normal_(0, 0.05)  # zero W_o would hide the attention output
    reference = tg.build_model(h)  # SDPA
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randint(0, h.vocab_size, (2, 32), generator=g) for _ in range(2))
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=recording, fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 the kernels require, as on CUDA
        loss = compiled(x, y)
        ref_loss = reference(x, y)
    loss.backward()
    ref_loss.backward()
    assert len(graphs) == 1 and not counters["graph_break"]
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("pgolf.standin_fwd" in op for op in ops), sorted(ops)
    torch.testing.assert_close(loss, ref_loss, atol=0.02, rtol=0.02)
    g_model, g_ref = model.qo_bank.grad, reference.qo_bank.grad
    assert (g_model - g_ref).abs().max() < 0.05 * g_ref.abs().max()


@pytest.fixture
def fake_modules(monkeypatch):
    """Install fake modules into sys.modules (removed again after the test)."""
    def install(name, **attrs):
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module
    return install


def test_fa4_candidate_wraps_flash_attn_cute_kernels(fake_modules):
    calls = []

    def fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        calls.append(("fwd", softmax_scale, causal, return_lse))
        return standin_fwd(q, k, v)

    def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False):
        calls.append(("bwd", softmax_scale, causal))
        return standin_bwd(dout, q, k, v, out, lse)

    fake_modules("flash_attn")
    fake_modules("flash_attn.cute")
    fake_modules("flash_attn.cute.interface", _flash_attn_fwd=fwd, _flash_attn_bwd=bwd)
    fa4 = next(c for c in tg.ATTENTION_CANDIDATES if c.name == "fa4")  # pinned: the shipped loaders (CUDA only)
    torch._dynamo.reset()
    assert fa4.cuda_only
    assert probed_runtime((fa4._replace(cuda_only=False),)).attention.name == "fa4"  # the probe: compiled, vs SDPA
    scale = TINY_LAYOUT[2] ** -0.5
    assert ("fwd", scale, True, True) in calls and ("bwd", scale, True) in calls


def test_fa3_candidate_loads_flash_attn_interface_and_drops_the_lse(fake_modules):
    fake_modules("flash_attn_interface", flash_attn_func=lambda q, k, v, causal: standin_fwd(q, k, v))
    fa3 = next(c for c in tg.ATTENTION_CANDIDATES if c.name == "fa3")  # pinned: the shipped loaders (CUDA only)
    assert fa3.cuda_only
    choice = probed_runtime((fa3._replace(cuda_only=False),), use_compile=False).attention
    q, k, v = qkv()
    assert choice.name == "fa3"
    torch.testing.assert_close(choice.fn(q, k, v).float(), tg.sdpa_attention(q, k, v).float(), atol=0.03, rtol=0.03)


# ------------------------------------------------------------------ an H100 that ended up on SDPA

def hopper_runtime(monkeypatch, capability=(9, 0), backend="sdpa"):
    """A compiled run on a (fake) GPU of `capability` whose attention is `backend`; on SDPA, FA3 was not found."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    fa3 = tg.AttentionCandidate("fa3", lambda: importlib.import_module("flash_attn_interface"))
    candidates = (fa3, tg.AttentionCandidate("sdpa", lambda: tg.sdpa_attention)) if backend == "sdpa" else (
        tg.AttentionCandidate(backend, lambda: tg.sdpa_attention),)
    rt = tg.with_attention(tg.single_process_runtime(), tiny_hparams(), candidates=candidates)
    return dataclasses.replace(rt, device=torch.device("cuda", 0), use_compile=True)


def attention_lines(capsys, h, rt):
    """The `attention*` lines of the run's header."""
    tg.log_header(h, rt)
    return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("attention")]


def test_h100_on_sdpa_logs_one_attention_warning_naming_cost_and_fix(monkeypatch, capsys):
    lines = attention_lines(capsys, tiny_hparams(), hopper_runtime(monkeypatch))
    assert lines[0] == "attention backend:sdpa detail:fa3 skipped: ModuleNotFoundError: No module named " \
                       "'flash_attn_interface'"
    assert len(lines) == 2
    line = lines[1]
    assert line.startswith("attention_warning backend:sdpa device:sm_90 detail:")
    for words in ("+15-25 ms/step", "1,000 fewer steps", "tools/install_flash_attn.py", "ACCEPT_SDPA=1"):
        assert words in line
    import logparse
    assert logparse.parse_text(line).event("attention_warning")["device"] == "sm_90"


def test_no_attention_warning_when_accepted_elsewhere_or_on_flash_attention(monkeypatch, capsys):
    accepted = tg.Hyperparameters.from_env({"ACCEPT_SDPA": "1", **settings_env(TINY)})
    assert accepted.accept_sdpa and "hparam accept_sdpa:1" in accepted.log_lines()
    h = tiny_hparams()
    assert len(attention_lines(capsys, h, hopper_runtime(monkeypatch))) == 2  # the warning, unless:
    assert len(attention_lines(capsys, accepted, hopper_runtime(monkeypatch))) == 1  # accepted
    assert len(attention_lines(capsys, h, hopper_runtime(monkeypatch, capability=(8, 0)))) == 1  # A100: no FA3 there
    assert attention_lines(capsys, h, hopper_runtime(monkeypatch, backend="fa3")) == ["attention backend:fa3"]
    cpu = tg.with_attention(tg.single_process_runtime(), h)
    assert attention_lines(capsys, h, cpu) == ["attention backend:sdpa detail:fa3 skipped: needs CUDA; fa4 skipped: "
                                               "needs CUDA"]


# ------------------------------------------------------------------ tools/install_flash_attn.py

H100_POD = {"torch": "2.9.1+cu128", "cuda": "12.8", "gpus": [(9, 0)] * 8, "system": "Linux", "machine": "x86_64"}
CU128_WHEEL = "https://download.pytorch.org/whl/cu128/flash_attn_3-3.0.0-cp39-abi3-manylinux_2_28_x86_64.whl"


def test_wheel_choice_follows_torch_cuda_build_gpu_and_platform():
    choose = install_flash_attn.choose_wheel
    assert choose(H100_POD) == ("install", CU128_WHEEL)
    assert choose(dict(H100_POD, cuda="13.0")) == ("install", CU128_WHEEL.replace("cu128", "cu130"))
    status, why = choose(dict(H100_POD, cuda="12.6", torch="2.7.0+cu126"))
    assert status == "unavailable" and "CUDA 12.6" in why and "cu128 and cu130" in why
    status, why = choose(dict(H100_POD, cuda=None, torch="2.13.0+cpu", gpus=[]))
    assert status == "unavailable" and "CPU build" in why
    status, why = choose(dict(H100_POD, gpus=[(8, 0)] * 8))
    assert status == "skipped" and "sm_80" in why
    status, why = choose(dict(H100_POD, machine="aarch64"))
    assert status == "unavailable" and "aarch64" in why


@pytest.fixture
def pod(monkeypatch, tmp_path):
    """An H100 pod without FlashAttention-3: its facts, and a fake pip whose installs land in a folder on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(install_flash_attn, "facts", lambda: dict(H100_POD))
    pip_calls = []

    def fake_pip(url, code=0, writes_module=True):
        pip_calls.append(url)
        if code == 0 and writes_module:
            (site / "flash_attn_interface.py").write_text("def flash_attn_func(q, k, v, causal=False):\n    pass\n")
        return code, "Successfully installed flash_attn_3-3.0.0" if code == 0 else "ERROR: 404 Not Found"

    monkeypatch.setattr(install_flash_attn, "run_pip", fake_pip)
    yield pip_calls
    sys.modules.pop("flash_attn_interface", None)


def test_installer_installs_the_matching_wheel_once(pod, capsys):
    assert install_flash_attn.main([]) == 0
    assert pod == [CU128_WHEEL]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"flash_attn_3 status:installed detail:{CU128_WHEEL}; flash_attn_interface imports"]
    assert install_flash_attn.main([]) == 0 and pod == [CU128_WHEEL]  # imports now: nothing to install
    assert capsys.readouterr().out.startswith("flash_attn_3 status:already_installed ")


def test_installer_says_why_it_could_not(pod, monkeypatch, capsys):
    monkeypatch.setattr(install_flash_attn, "facts", lambda: dict(H100_POD, cuda="12.6", torch="2.7.0+cu126"))
    assert install_flash_attn.main([]) == 4 and pod == []
    line = capsys.readouterr().out.strip()
    assert line.startswith("flash_attn_3 status:unavailable detail:torch 2.7.0+cu126 is built for CUDA 12.6")
    assert "\n" not in line and line.endswith("training uses SDPA")
    monkeypatch.setattr(install_flash_attn, "facts", lambda: dict(H100_POD))
    real_pip = install_flash_attn.run_pip
    monkeypatch.setattr(install_flash_attn, "run_pip", lambda url: real_pip(url, code=1))
    assert install_flash_attn.main([]) == 4
    assert "status:failed detail:pip install " in capsys.readouterr().out
    monkeypatch.setattr(install_flash_attn, "run_pip", lambda url: real_pip(url, writes_module=False))
    assert install_flash_attn.main([]) == 4
    assert "but flash_attn_interface does not import" in capsys.readouterr().out


def test_installer_on_this_cpu_machine_reports_one_line(capsys):
    """The installer on this machine's real facts (a CPU build of torch): exit 4, one line saying why."""
    assert install_flash_attn.main([]) == 4
    out = capsys.readouterr()
    assert not out.err and out.out.count("\n") == 1
    assert out.out.startswith("flash_attn_3 status:unavailable detail:torch ") and "CPU build" in out.out


PYTHON_SHIM = """#!/usr/bin/env bash
echo "python3 $*" >> "$CALLS"
case "$1 $2" in "-m pip") exit 0;; esac
case "$1" in data/cached_challenge_fineweb.py) exit 0;; esac
exec {python} "$@"
"""
RECORDING_SHIM = """#!/usr/bin/env bash
echo "{name} $*" >> "$CALLS"
{body}
"""


@pytest.mark.slow  # runs run.sh (bash, the installer, the packer)
def test_run_sh_gpu_branch_runs_the_installer_before_training(tmp_path):
    """nvidia-smi lists one GPU, pip and the FineWeb download only record their calls, torchrun records its launch;
    the installer runs for real (this machine's CPU torch: it says why it cannot install, and the job goes on)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"python3": PYTHON_SHIM.format(python=sys.executable),
             "nvidia-smi": RECORDING_SHIM.format(name="nvidia-smi", body='echo "GPU 0: NVIDIA H100 80GB HBM3"'),
             "torchrun": RECORDING_SHIM.format(name="torchrun", body="exit 0")}
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls))
    env.pop("MODE", None)
    out = subprocess.run(["bash", str(ROOT / "run.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("flash_attn_3 ")] == out.stdout.splitlines()[:1]
    assert "status:unavailable" in out.stdout
    ran = [ln.split()[:2] for ln in calls.read_text().splitlines() if not ln.startswith("nvidia-smi")]
    assert ran == [["python3", "-m"], ["python3", "tools/install_flash_attn.py"],
                   ["python3", "data/cached_challenge_fineweb.py"], ["python3", "tools/pack.py"],
                   ["torchrun", "--standalone"]]
    assert calls.read_text().splitlines()[-1] == "torchrun --standalone --nproc_per_node=1 packed/train_gpt.py"
    packed = ROOT / "packed" / "train_gpt.py"  # the record runs (and counts) the packed form of today's source
    assert tg.unpack_source(packed.read_text(encoding="utf-8")) == (ROOT / "train_gpt.py").read_text(encoding="utf-8")


@pytest.mark.slow  # inductor compiles C++ kernels
def test_wrapped_kernel_passes_the_probe_under_inductor():
    torch._dynamo.reset()
    wrapped = tg.custom_attention("standin", standin_fwd, standin_bwd)
    standin = (tg.AttentionCandidate("standin", lambda: wrapped),)
    assert probed_runtime(standin, compile_backend="inductor").attention.name == "standin"
