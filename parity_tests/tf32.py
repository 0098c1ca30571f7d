"""TF32 settings through the API this torch has: read, restore, and check that TF32 is off everywhere.
Used by parity_tests/test_cuda.py and tests/test_gpu_check.py."""
from __future__ import annotations

import torch

from torchgpt.runtime import set_tf32

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
