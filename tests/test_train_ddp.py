"""DistributedDataParallel on the CPU (gloo, 127.0.0.1): two processes, each on its own half of a
batch, end a backward with the gradients of one process on the whole batch (float64, to the
rounding of a model's forward and backward with its sums split otherwise: MODEL), also through
gradient accumulation (the global batch kept, nanoGPT's rule); the evaluation split between the
ranks gives one process's mean; train_torch.py itself under torchrun with two processes. And
gradient accumulation on one process, in both backends."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ddp_helpers import B_PER_RANK, CFG, ddp_env, free_port, rank_run, run_ranks
from train_helpers import ROOT, assert_one_error_line, check, needs_data, run_main, tiny_args

import npgpt
import npgpt.fast
from gptapp.backends.numpy import accumulate_gradients as numpy_accumulate
from gptapp.backends.torch import accumulate_gradients as torch_accumulate
from gptapp.errors import UsageError
from gptapp.backend import local_accumulation_steps
from gptapp.torch_checkpoint import load_torch_checkpoint
from npgpt import bounds
from npgpt.config import GPTConfig
from torchgpt.convert import load_params
from torchgpt.model import GPT
from torchgpt.runtime import DeviceBatches

# Gradients of one batch, split into parts (ranks, micro-batches) or not, in float64: the 2-layer
# model's forward and backward (PARITY_DEPTH stages) with its sums added in other orders; the longest
# is a weight gradient over the positions of 4 micro-batches (4 B T = 128 terms, > 4 n_embd = 64).
N_SUM = 4 * B_PER_RANK * CFG["block_size"]
MODEL = bounds.chain(np.float64, N_SUM, bounds.PARITY_DEPTH, bounds.PARITY_AMPLIFICATION)


def test_two_ranks_equal_one_process_on_the_whole_batch_with_and_without_accumulation(tmp_path, monkeypatch):
    """Two gloo processes (one launch, rank_run's three parts):

    1. a plain DDP step: the ranks split one batch, and each ends its backward with the gradient of one
       process on the whole batch (float64), from rank 0's weights;
    2. --gradient_accumulation_steps 4 on 2 ranks: 2 micro-batches each, one all-reduce; the gradient
       is that of one process on all 4 micro-batches at once (float64);
    3. the ranks split the 5 evaluation batches (3 and 2) and report the mean that one process (rank_run
       here, without torchrun's environment) gets over the same 5.
    """
    ranks = run_ranks(tmp_path, 2, 4)

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    data = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=500)
    x, y = DeviceBatches(data, 2 * B_PER_RANK, CFG["block_size"], torch.device("cpu"), seed=5).get()
    step = [r["step"] for r in ranks]
    assert torch.equal(torch.cat([step[0]["x"], step[1]["x"]]), x), "the ranks did not split one batch"
    assert not torch.equal(step[0]["x"], step[1]["x"]), "both ranks drew the same batch"
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        for r in (0, 1):
            check(f"step: rank {r} {name}", step[r]["grads"][name], p.grad, MODEL)

    assert [len(r["x"]) for r in ranks] == [2, 2], "each rank must run 4 / 2 micro-batches"
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    x = torch.cat([r["x"][k] for r in ranks for k in range(2)])  # (4 * B, T): the global batch
    y = torch.cat([r["y"][k] for r in ranks for k in range(2)])
    assert len(torch.unique(x, dim=0)) == 4 * B_PER_RANK, "micro-batches were drawn twice"
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        for r in (0, 1):
            check(f"accumulation: rank {r} {name}", ranks[r]["grads"][name], p.grad, MODEL)

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rank_run(tmp_path / "one.pt", 4)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert len(one["x"]) == 4 and one["forwards"] == 2 * 5
    assert [r["forwards"] for r in ranks] == [2 * 3, 2 * 2], "the ranks must split the evaluation batches"
    # evaluate sums the batch losses in float32 (as on a GPU): the 2 ranks add the same 5 positive
    # terms in another order than one process (3 + 2, then the all-reduce); the batches are the same
    order = bounds.reordered(np.float32, n=5, cancellation=1.0)
    for split in ("train", "val"):
        for r in (0, 1):
            assert ranks[r]["losses"][split] == ranks[0]["losses"][split], "the ranks disagree"
        assert abs(ranks[0]["losses"][split] - one["losses"][split]) <= order * abs(one["losses"][split]), \
            (split, ranks[0]["losses"][split], one["losses"][split])


def test_accumulation_steps_must_divide_among_the_processes():
    assert local_accumulation_steps(8, 2) == 4 and local_accumulation_steps(3, 1) == 3
    with pytest.raises(UsageError, match=r"--gradient_accumulation_steps 1 does not divide among the 2 processes"
                                         r".*pass a multiple of 2, e.g. --gradient_accumulation_steps 2"):
        local_accumulation_steps(1, 2)
    with pytest.raises(UsageError, match="e.g. --gradient_accumulation_steps 12"):
        local_accumulation_steps(10, 4)


@needs_data
def test_torchrun_with_an_accumulation_that_does_not_divide_is_one_line_before_any_work(tmp_path, capsys,
                                                                                       monkeypatch):
    """The check that every rank makes before the process group or the out_dir exist."""
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    out = tmp_path / "out"
    res = run_main("torch", tiny_args(out, "--device", "cpu", "--gradient_accumulation_steps", 3), capsys)
    line = assert_one_error_line(res, "--gradient_accumulation_steps 3", "2 processes", "multiple of 2", rc=2)
    assert line.startswith("error:") and not out.exists()


def micro_batches(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, CFG["vocab_size"], size=(B_PER_RANK, CFG["block_size"])) for _ in "xy")
            for _ in range(n)]


@pytest.mark.parametrize("model_class", [npgpt.GPT, npgpt.fast.GPT], ids=["reference", "fast"])
def test_numpy_accumulation_is_the_gradient_of_the_combined_batch_and_equals_torch(model_class):
    """3 micro-batches: sum of the micro-batch gradients / 3 == the gradient on all of them at once,
    and == the torch backend's accumulate_gradients (float64: MODEL, and npgpt against torchgpt, parity).
    The losses are means of positive terms over the 3 B T positions; torch's is a forward's parity."""
    batches = micro_batches(3)
    model = model_class(GPTConfig(**CFG), seed=3, dtype=np.float64)
    feed = iter(batches)
    grads, losses = numpy_accumulate(model, lambda: next(feed), 3)
    assert len(losses) == 3

    whole = model_class(GPTConfig(**CFG), seed=3, dtype=np.float64)
    _, loss = whole.forward(np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]))
    n = 3 * B_PER_RANK * CFG["block_size"]
    assert abs(loss - sum(losses) / 3) <= bounds.reordered(np.float64, n, cancellation=1.0) * loss
    expected = whole.backward()
    for name in expected:
        check(f"numpy {name}", grads[name], expected[name], MODEL)

    class Fed:
        """DeviceBatches' get(), feeding the same micro-batches."""
        def __init__(self):
            self.left = iter(batches)

        def get(self):
            x, y = next(self.left)
            return torch.from_numpy(x), torch.from_numpy(y)

    twin = GPT(GPTConfig(**CFG)).double()
    load_params(twin, {k: v.copy() for k, v in whole.params.items()})
    mean_loss = torch_accumulate(twin, Fed(), 3, contextlib.nullcontext(), ddp=False)
    forward = bounds.parity(np.float64, n, depth=bounds.PARITY_DEPTH // 2)
    assert abs(mean_loss.item() - sum(losses) / 3) <= forward * abs(mean_loss.item())
    for name, p in twin.named_parameters():
        check(f"torch {name}", p.grad, grads[name], bounds.parity(np.float64, n))


def test_numpy_accumulation_stops_at_a_non_finite_loss():
    model = npgpt.GPT(GPTConfig(**CFG), seed=3, dtype=np.float64)
    model.params["transformer.wte.weight"][...] = np.nan
    grads, losses = numpy_accumulate(model, iter(micro_batches(3)).__next__, 3)
    assert grads is None and len(losses) == 1 and not np.isfinite(losses[0])


@needs_data
def test_train_torch_under_torchrun(tmp_path):
    """Two CPU processes: only rank 0 logs and saves; the checkpoint carries both ranks' RNG state."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "train_torch.py"),
           *map(str, tiny_args(out, "--max_iters", 10, "--eval_interval", 10, "--device", "cpu",
                               "--gradient_accumulation_steps", 2))]
    p = subprocess.run(cmd, cwd=tmp_path, env=ddp_env(0), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("torchgpt: 0.03M parameters") == 1, "a rank other than 0 logged"
    assert "world size 2" in p.stdout and "step 10: train loss" in p.stdout
    assert "iter 0: loss" in p.stdout and "Traceback" not in p.stderr
    ckpt = load_torch_checkpoint(out / "ckpt_last.pt")
    assert ckpt.iter_num == 10 and ckpt.rng["world_size"] == 2 and len(ckpt.rng["per_rank"]) == 2
    assert not torch.equal(ckpt.rng["per_rank"][0]["torch_cpu"], ckpt.rng["per_rank"][1]["torch_cpu"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 10]
