"""--muon_ns_dtype: torchgpt.muon.Muon's Newton-Schulz iteration in bfloat16 (torch's) or float32.

1. The float32 iteration against npgpt.optim.Muon's (float64, and float32), within
   bounds.newton_schulz; the bound is tight enough to tell a bfloat16 iteration from it.
2. The optimizer: bfloat16 is torch.optim.Muon's step bit for bit; float32 is torch's step with only
   the iteration's dtype changed, bit for bit; the state_dicts load into each other.
3. "auto": resolve_ns_dtype with injected capabilities (float32 on a CPU without bfloat16 matmul
   kernels, bfloat16 on CUDA), and oneDNN's answer under ONEDNN_MAX_CPU_ISA=AVX2.
4. The setting: a TrainConfig field with a train_torch.py flag, none in train_np.py.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from npgpt import bounds
from npgpt.compare import compare_all
from npgpt.optim import Muon as NpMuon
from torchgpt import muon as tmuon

NS = (3.4445, -4.775, 2.0315)
# tall, wide and square as parity_tests/test_optim.py's Muon, and modern-cpu's c_fc (2H, C) = (688, 128)
SHAPES = {"tall": (24, 8), "wide": (8, 24), "square": (12, 12), "c_fc": (688, 128)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(rng, shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def singular_values(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x.astype(np.float64), compute_uv=False)


# --------------------------------------------------------------------------------------------
# 1. The iteration
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("npgpt_dtype", [np.float64, np.float32], ids=["np-f64", "np-f32"])
def test_float32_iteration_matches_npgpt_muon(npgpt_dtype):
    """The same float32 input through torchgpt's float32 iteration and npgpt.optim.Muon's (its
    orthogonalize: zeropower_via_newton_schulz in the parameters' dtype). Against float64 the bound
    is the float32 side's rounding; against float32 both sides round, which reordered (inside
    bounds.newton_schulz) counts already."""
    rng = np.random.default_rng(0)
    ours, theirs, rtol = {}, {}, {}
    for name, shape in SHAPES.items():
        u = randn(rng, shape)
        opt = NpMuon({"w": np.zeros(shape, npgpt_dtype)})
        theirs[name] = opt.orthogonalize(u.astype(npgpt_dtype))
        ours[name] = tmuon.zeropower_via_newton_schulz(torch.tensor(u), NS, 5, 1e-7, torch.float32)
        assert ours[name].dtype == torch.float32
        rtol[name] = bounds.newton_schulz(np.float32, shape, singular_values(u))
    compare_all(ours, theirs, rtol=rtol,
                header=f"Newton-Schulz in float32 vs npgpt.optim.Muon [{np.dtype(npgpt_dtype).name}]")


def test_float32_bound_catches_a_bfloat16_iteration():
    """The bound of test 1 is a test: torch's bfloat16 iteration (what --muon_ns_dtype float32 must
    not run) is outside it for every shape, and the float32 one inside."""
    rng = np.random.default_rng(1)
    for name, shape in SHAPES.items():
        u = randn(rng, shape)
        exact = NpMuon({"w": np.zeros(shape)}).orthogonalize(u.astype(np.float64))
        bound = bounds.newton_schulz(np.float32, shape, singular_values(u))
        errors = {}
        for dtype in (torch.bfloat16, torch.float32):
            out = tmuon.zeropower_via_newton_schulz(torch.tensor(u), NS, 5, 1e-7, dtype).double().numpy()
            errors[dtype] = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        print(f"{name} {shape}: bfloat16 {errors[torch.bfloat16]:.2e}, float32 {errors[torch.float32]:.2e}, "
              f"bound {bound:.2e}")
        assert errors[torch.float32] <= bound < errors[torch.bfloat16]


def test_bfloat16_iteration_is_torchs():
    """With dtype bfloat16 the function is torch's _zeropower_via_newtonschulz: the same operations
    in the same order, so the same bits."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    rng = np.random.default_rng(2)
    for shape in SHAPES.values():
        g = torch.tensor(randn(rng, shape))
        ours = tmuon.zeropower_via_newton_schulz(g, NS, 5, 1e-7, torch.bfloat16)
        assert torch.equal(ours, _zeropower_via_newtonschulz(g, NS, 5, 1e-7)), shape  # bounds.bitwise


# --------------------------------------------------------------------------------------------
# 2. The optimizer
# --------------------------------------------------------------------------------------------

def torch_muon_in(dtype):
    """torch.optim.Muon whose module-level iteration runs in `dtype`: torch's step, only that changed."""
    def ns(grad, ns_coefficients, ns_steps, eps):
        return tmuon.zeropower_via_newton_schulz(grad, ns_coefficients, ns_steps, eps, dtype)
    return ns


def run_steps(opt, params, grads_list):
    for grads in grads_list:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def make_params(seed):
    rng = np.random.default_rng(seed)
    return [torch.tensor(randn(rng, s, 0.5), requires_grad=True) for s in SHAPES.values()]


def make_grads(seed, steps):
    rng = np.random.default_rng(seed)
    return [[torch.tensor(randn(rng, s)) for s in SHAPES.values()] for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_muon_step_is_torchs_with_the_iteration_in_dtype(dtype, nesterov, monkeypatch):
    """10 steps of torchgpt.muon.Muon(ns_dtype) against torch.optim.Muon (its iteration patched to
    `dtype` for float32, untouched for bfloat16): parameters and momentum buffers bit for bit."""
    why = bounds.bitwise("torch's _single_tensor_muon and torchgpt.muon.Muon.step run the same torch "
                         "operations in the same order, the iteration in the same dtype")
    ours_p, theirs_p = make_params(3), make_params(3)
    grads = make_grads(4, 10)
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov)
    ours = tmuon.Muon(ours_p, ns_dtype=dtype, **kw)
    if dtype != torch.bfloat16:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", torch_muon_in(dtype))
    theirs = torch.optim.Muon(theirs_p, **kw)
    run_steps(ours, ours_p, grads)
    run_steps(theirs, theirs_p, grads)
    compare_all({f"p{i}": p.detach() for i, p in enumerate(ours_p)} |
                {f"buf{i}": ours.state[p]["momentum_buffer"] for i, p in enumerate(ours_p)},
                {f"p{i}": p.detach() for i, p in enumerate(theirs_p)} |
                {f"buf{i}": theirs.state[p]["momentum_buffer"] for i, p in enumerate(theirs_p)},
                atol=why, header=f"torchgpt.muon.Muon vs torch.optim.Muon, iteration in {dtype}")
    moved = make_params(3)
    assert all(not torch.equal(p, q) for p, q in zip(ours_p, moved))  # it moved


def test_state_dict_is_torchs_both_ways():
    """A float32-iteration run's state loads into torch.optim.Muon and the other way, and the steps
    after it go on as in an unbroken run: the dtype is not part of the state."""
    why = bounds.bitwise("the same steps from the same state")
    grads = make_grads(5, 6)
    straight_p = make_params(6)
    straight = tmuon.Muon(straight_p, lr=0.02, ns_dtype=torch.float32)
    run_steps(straight, straight_p, grads)

    first_p = make_params(6)
    first = tmuon.Muon(first_p, lr=0.02, ns_dtype=torch.float32)
    run_steps(first, first_p, grads[:3])
    saved = first.state_dict()
    plain = torch.optim.Muon(first_p, lr=0.02)  # torch's own class takes it
    plain.load_state_dict(saved)
    assert plain.state_dict()["param_groups"] == saved["param_groups"]
    back = tmuon.Muon(first_p, lr=0.02, ns_dtype=torch.float32)
    back.load_state_dict(plain.state_dict())  # and gives it back
    run_steps(back, first_p, grads[3:])
    compare_all({f"p{i}": p.detach() for i, p in enumerate(first_p)},
                {f"p{i}": p.detach() for i, p in enumerate(straight_p)}, atol=why,
                header="float32 Muon resumed through torch.optim.Muon's state_dict")


def test_configure_muon_adamw_takes_the_setting():
    import torchgpt
    from npgpt.config import GPTConfig
    from torchgpt.model import configure_muon_adamw
    model = torchgpt.GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    for request, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        opt = configure_muon_adamw(model, 0.1, 1e-3, 0.02, (0.9, 0.99), "cpu", request)
        assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
        assert opt.optimizers["muon"].ns_dtype == expected
    assert configure_muon_adamw(model, 0.1, 1e-3, 0.02, (0.9, 0.99), "cuda", "auto").optimizers["muon"].ns_dtype \
        == torch.bfloat16


def test_muon_refuses_a_dtype_that_is_not_one():
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        tmuon.Muon(make_params(0), ns_dtype="float32")


# --------------------------------------------------------------------------------------------
# 3. auto
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, device_type, bf16_native, expected", [
    ("auto", "cpu", False, torch.float32),  # AVX2 only: bfloat16 matmuls emulated
    ("auto", "cpu", True, torch.bfloat16),  # AVX512-BF16 / AMX: torch's choice
    ("auto", "cuda", False, torch.bfloat16),  # a GPU: torch's choice, whatever the host CPU
    ("auto", "cuda", True, torch.bfloat16),
    ("auto", "mps", False, torch.bfloat16),
    ("bfloat16", "cpu", False, torch.bfloat16),  # asked for: taken as given
    ("float32", "cuda", True, torch.float32),
])
def test_auto_resolves_from_the_capability(request_, device_type, bf16_native, expected):
    assert tmuon.resolve_ns_dtype(request_, device_type, bf16_native=bf16_native) == expected


def test_auto_on_cpu_asks_onednn(monkeypatch):
    """Without an injected answer, "auto" on the CPU asks onednn_bf16_matmul, and only there."""
    for answer, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(tmuon, "onednn_bf16_matmul", lambda answer=answer: answer)
        assert tmuon.resolve_ns_dtype("auto", "cpu") == expected
    monkeypatch.setattr(tmuon, "onednn_bf16_matmul", lambda: pytest.fail("asked on CUDA"))
    assert tmuon.resolve_ns_dtype("auto", "cuda") == torch.bfloat16


def test_onednn_answer_follows_torch_backends_mkldnn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # torch then never uses oneDNN's kernels
    assert tmuon.onednn_bf16_matmul() is False


def test_unknown_request_is_refused():
    with pytest.raises(ValueError, match="'float16' is unknown; use one of auto, bfloat16, float32"):
        tmuon.resolve_ns_dtype("float16", "cpu", bf16_native=True)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 is x86's")
def test_onednn_max_cpu_isa_avx2_is_seen_as_emulated():
    """The emulation used to benchmark a CPU without bfloat16 kernels on one that has them: oneDNN
    capped at AVX2 has no bfloat16 matmul, whatever the machine, and auto then picks float32."""
    code = ("import torch; from torchgpt.muon import onednn_bf16_matmul, resolve_ns_dtype; "
            "print(onednn_bf16_matmul(), resolve_ns_dtype('auto', 'cpu'))")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "torch.float32"]


# --------------------------------------------------------------------------------------------
# 4. The setting
# --------------------------------------------------------------------------------------------

def test_setting_is_a_torch_flag_and_not_a_numpy_one(capsys):
    from gptapp.cli import train_config_from_args, train_parser
    from gptapp.settings import TrainConfig
    assert TrainConfig().muon_ns_dtype == "auto"
    args = train_parser("train_torch.py", "", torch_flags=True).parse_args(
        ["--preset", "modern-cpu", "--muon_ns_dtype", "float32"])
    cfg = train_config_from_args(args)
    assert cfg.muon_ns_dtype == "float32" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "muon_ns_dtype"}
                                 ).muon_ns_dtype == "auto"  # a checkpoint saved before the setting
    with pytest.raises(SystemExit) as exit_:
        train_parser("train_np.py", "", numpy_flags=True).parse_args(["--muon_ns_dtype", "float32"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --muon_ns_dtype float32" in err


def test_setting_refuses_an_unknown_dtype():
    from gptapp.cli import UsageError, train_config_from_args, train_parser
    args = train_parser("train_torch.py", "", torch_flags=True).parse_args(["--muon_ns_dtype", "float16"])
    with pytest.raises(UsageError, match=r"--muon_ns_dtype='float16' is invalid: use one of auto, bfloat16, float32"):
        train_config_from_args(args)
