"""Settings shared by the parity suite: torch threads and the hypothesis profiles.

Hypothesis profiles, chosen with the environment variable HYPOTHESIS_PROFILE:
    ci    (default) few examples, derandomized: every run draws the same examples, so CI is
          reproducible and a failure there fails again locally.
    deep  many random examples, for hunting: HYPOTHESIS_PROFILE=deep pytest parity_tests/test_properties.py
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# One torch thread per process: the suite runs under `pytest -n 2` on 2 cores, and torch's
# intra-op thread pool on these tiny tensors costs far more than it saves (a 16-channel GPT's
# forward + backward takes ~1 s with 2 threads per worker competing, ~2 ms with one).
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,  # a first torch call can take a while; timing is not what we test
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
