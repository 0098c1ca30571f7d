"""The model-level parity tests on a CUDA GPU: torch on the device against npgpt on the CPU.

The cases of test_model.test_gpt_logits_loss_grads, run through the same check_model_parity with
device="cuda", in float64 (1e-12) and float32 (1e-5 logits/loss, 1e-4 gradients) with TF32 off:
TF32 rounds matmul inputs to 10 mantissa bits (~1e-3), which is a different computation, not a
rounding error of this one. Skipped where torch sees no GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_tests.test_model import ATTENTIONS, DTYPES, check_model_parity
from parity_tests.twins import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.fixture(autouse=True)
def full_precision_float32():
    """TF32 off for matmuls and cuDNN during each test, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


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
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    got = (torch.from_numpy(a).float().cuda() @ torch.from_numpy(b).float().cuda()).double().cpu().numpy()
    want = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6  # TF32 would give ~1e-4
