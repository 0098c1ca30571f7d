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
from parity_tests.tf32 import full_precision_settings, set_tf32_settings, tf32_is_off, tf32_settings
from parity_tests.twins import ATTENTIONS, check_model_parity, small_config

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
REQUIRE_ENV = "NPGPT_REQUIRE_CUDA"
CUDA_REQUIRED = os.environ.get(REQUIRE_ENV, "") not in ("", "0")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not CUDA_REQUIRED,
                                reason=f"CUDA not available (set {REQUIRE_ENV}=1 to make that a failure)")


@pytest.fixture(autouse=True)
def cuda_is_there():
    if not torch.cuda.is_available():  # only reached with NPGPT_REQUIRE_CUDA set
        pytest.fail(f"{REQUIRE_ENV}=1 but torch {torch.__version__} sees no CUDA device "
                    f"(torch.version.cuda = {torch.version.cuda})", pytrace=False)


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
