"""The parity table for a student: how far npgpt's hand-written backprop is from torch autograd.

    python -m parity_tests.report              # float64 and float32 tables, then a summary
    python -m parity_tests.report --attention sdpa

For one batch through a default GPT (dropout on, masks shared), every tensor's max absolute and
normwise relative error ||npgpt - torch|| / ||torch||: the logits, the loss and each parameter's
gradient. A figure script can take the numbers from `parity_table`.
"""
from __future__ import annotations

import argparse

import numpy as np

import npgpt
from npgpt.compare import Row, error_rows, format_table
from parity_tests.twins import describe, model_pair_results

DEFAULT_CONFIG = npgpt.GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32,
                                 dropout=0.1, bias=True, activation="gelu", tie_weights=True)
FORWARD_NAMES = ("logits", "loss")


def parity_table(dtype=np.float64, config: npgpt.GPTConfig | None = None, attention: str = "explicit",
                 batch_size: int = 4, seed: int = 0) -> list[tuple[str, tuple, float, float]]:
    """[(name, shape, max_abs, rel)] for the logits, the loss, then every parameter's gradient."""
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads cost more than they save
    config = DEFAULT_CONFIG if config is None else config
    ours_fwd, theirs_fwd, ours_grads, theirs_grads = model_pair_results(
        config, dtype, attention, B=batch_size, seed=seed)
    rows = error_rows({**ours_fwd, **ours_grads}, {**theirs_fwd, **theirs_grads})
    return [(r.name, r.shape, r.max_abs, r.rel) for r in rows]


def summary(table, dtype) -> str:
    """One line: the worst relative error among the forward outputs and among the gradients."""
    fwd = [t for t in table if t[0] in FORWARD_NAMES]
    grads = [t for t in table if t[0] not in FORWARD_NAMES]
    f, g = max(fwd, key=lambda t: t[3]), max(grads, key=lambda t: t[3])
    return (f"{np.dtype(dtype).name}: worst relative error, forward {f[3]:.2e} ({f[0]}), "
            f"gradients {g[3]:.2e} ({g[0]})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=["explicit", "sdpa"], default="explicit",
                        help="torch's attention path (with dropout masks SDPA falls back to explicit)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = []
    for dtype in (np.float64, np.float32):
        table = parity_table(dtype, attention=args.attention, batch_size=args.batch_size, seed=args.seed)
        rows = [Row(*t) for t in table]
        header = f"npgpt vs torch, {np.dtype(dtype).name}, {describe(DEFAULT_CONFIG)}, {args.attention}"
        print(format_table(rows, header, show_bounds=False) + "\n")
        lines.append(summary(table, dtype))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
