"""The model-level parity tests on a CUDA GPU: torch on the device against npgpt on the CPU.

The cases of test_model.test_gpt_logits_loss_grads, run through the same check_model_parity with
device="cuda", in float64 and float32 at npgpt.compare.bounds for each model's sizes, TF32 off:
TF32 rounds matmul inputs to 10 mantissa bits (~1e-3), which is a different computation, not a
rounding error of this one.

Where torch sees no GPU they are skipped, unless NPGPT_REQUIRE_CUDA=1 (make gpu-check sets it): then
every test fails, so that a CPU-only torch build on a GPU machine cannot pass the GPU check.
TF32 is read and set through whichever API the running torch has: the `fp32_precision` attributes
where they exist (torch >= 2.9; reading the legacy flags after the new API was used raises), else
the legacy `allow_tf32` flags.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from npgpt import bounds
from parity_tests.test_model import ATTENTIONS, DTYPES, check_model_parity
from parity_tests.twins import small_config
from torchgpt.runtime import set_tf32

REQUIRE_ENV = "NPGPT_REQUIRE_CUDA"
CUDA_REQUIRED = os.environ.get(REQUIRE_ENV, "") not in ("", "0")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not CUDA_REQUIRED,
                                reason=f"CUDA not available (set {REQUIRE_ENV}=1 to make that a failure)")


@pytest.fixture(autouse=True)
def cuda_is_there():
    if not torch.cuda.is_available():  # only reached with NPGPT_REQUIRE_CUDA set
        pytest.fail(f"{REQUIRE_ENV}=1 but torch {torch.__version__} sees no CUDA device "
                    f"(torch.version.cuda = {torch.version.cuda})", pytrace=False)


def new_tf32_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def tf32_settings():
    """The TF32 settings of matmuls and cuDNN convolutions, through the API this torch has."""
    if new_tf32_api():
        return ("new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    return ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def set_tf32_settings(settings) -> None:
    """Back to `settings`, through torchgpt.runtime.set_tf32: setting the new API alone would leave
    the legacy flags unreadable for the rest of the process (inductor reads them)."""
    _, matmul, conv = settings
    set_tf32(matmul in (True, "tf32") or conv in (True, "tf32"))


def full_precision_settings():
    return ("new", "ieee", "ieee") if new_tf32_api() else ("legacy", False, False)


def tf32_is_off() -> bool:
    """No TF32 anywhere. A cuDNN "none" (new API) inherits the cudnn-wide setting, which the legacy
    setter turned off with the rest."""
    _, matmul, conv = tf32_settings()
    return matmul in (False, "ieee") and conv in (False, "ieee", "none")


@pytest.fixture(autouse=True)
def full_precision_float32(cuda_is_there):
    """TF32 off for matmuls and cuDNN during each test, restored afterwards."""
    saved = tf32_settings()
    set_tf32_settings(full_precision_settings())
    yield
    set_tf32_settings(saved)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_on_cuda(dtype, activation, bias, tie, dropout, attention):
    cfg = small_config(activation=activation, bias=bias, tie_weights=tie, dropout=dropout)
    rows, _ = check_model_parity(cfg, dtype, attention, device="cuda")
    assert rows[0].name == "logits"


@pytest.mark.parametrize("dtype", DTYPES)
def test_tf32_is_off(dtype):
    """The fixture's promise: a float32 matmul on the GPU is exact to float32, not TF32."""
    assert tf32_is_off(), tf32_settings()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    got = (torch.from_numpy(a).float().cuda() @ torch.from_numpy(b).float().cuda()).double().cpu().numpy()
    want = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
    # a 64-term dot product reordered in float32; TF32 (10-bit inputs) would give ~1e-4
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= bounds.reordered(np.float32, 64)
