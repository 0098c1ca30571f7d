"""train_torch.py end to end on the CPU: a `tiny` run as a subprocess (log lines, checkpoints,
metrics.jsonl, loss.png, the sample), --resume bit for bit, the bigram preset, SDPA against the
explicit attention in float32, batches drawn on the device, and device/dtype choices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import (
    DATA,
    EVAL_LINE,
    ITER_LINE,
    check,
    check_run_dir,
    needs_data,
    run_main,
    run_subprocess,
    tiny_args,
)

from npgpt import bounds
from npgpt.config import GPTConfig
from torchgpt.model import GPT
from gptapp.torch_checkpoint import load_torch_checkpoint
from torchgpt.runtime import DeviceBatches, pick_device, pick_dtype


@needs_data
def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    res = run_subprocess("torch", tiny_args(out, "--device", "cpu"), cwd=tmp_path)
    assert res.rc == 0, res.err
    assert "Traceback" not in res.err
    lines = res.out.splitlines()
    assert lines[0] == "torchgpt: 0.03M parameters, vocab 65, 1,003,854 train / 111,540 val tokens"
    assert lines[1] == "device cpu, dtype float32, compile off, attention sdpa, world size 1"
    assert [int(m) for m in EVAL_LINE.findall(res.out)] == [0, 20, 40]
    assert [int(m) for m in ITER_LINE.findall(res.out)] == [0, 10, 20, 30]  # no mfu on a CPU
    check_run_dir(out, ".pt", 40)
    ckpt = load_torch_checkpoint(out / "ckpt_last.pt")
    assert ckpt.iter_num == 40 and ckpt.backend == "torch" and len(ckpt.vocab) == 65
    raw = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert set(raw) >= {"model_state", "optimizer", "rng", "gpt_config", "train_config", "vocab", "iter_num"}
    assert all(not k.startswith("_orig_mod.") for k in raw["model_state"])

    argv = ["sample", "--ckpt", out / "ckpt_best.pt", "--prompt", "ROMEO:", "--max_new_tokens", 40,
            "--temperature", 0.8, "--top_k", 40, "--seed", 1, "--device", "cpu"]
    first = run_subprocess("torch", argv, cwd=tmp_path)
    assert first.rc == 0 and first.err == "", first.err
    assert first.out.startswith("ROMEO:") and len(first.out) == len("ROMEO:") + 40 + 1
    assert run_main("torch", argv, capsys).out == first.out  # in-process: a second subprocess costs seconds


def state_of(path) -> dict:
    return torch.load(path, weights_only=True)


@needs_data
def test_resume_is_bit_identical(tmp_path, capsys):
    """40 steps == 20 steps + --resume + 20 steps: parameters, AdamW state, data and dropout RNG."""
    common = ["--dropout", 0.1, "--max_new_tokens", 0, "--device", "cpu"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main("torch", tiny_args(straight, "--max_iters", 40, *common), capsys).rc == 0
    assert run_main("torch", tiny_args(split, "--max_iters", 20, "--lr_decay_iters", 40, *common), capsys).rc == 0
    res = run_main("torch", ["--resume", "--data", DATA, "--out_dir", split, "--max_iters", 40, "--device", "cpu"],
                   capsys)
    assert res.rc == 0, res.err
    assert "resuming from" in res.out

    a, b = state_of(straight / "ckpt_last.pt"), state_of(split / "ckpt_last.pt")
    assert a["iter_num"] == b["iter_num"] == 40
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), f"{k} differs after resume"
    for i, st in a["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], b["optimizer"]["state"][i][key]), f"optimizer {i}.{key} differs"
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert torch.equal(a["rng"]["per_rank"][0]["torch_cpu"], b["rng"]["per_rank"][0]["torch_cpu"])


@needs_data
def test_bigram_preset(tmp_path, capsys):
    out = tmp_path / "out"
    res = run_main("torch", ["--preset", "bigram", "--data", DATA, "--out_dir", out, "--max_iters", 30,
                             "--eval_interval", 15, "--eval_iters", 2, "--max_new_tokens", 10, "--device", "cpu"],
                   capsys)
    assert res.rc == 0, res.err
    assert [int(m) for m in EVAL_LINE.findall(res.out)] == [0, 15, 30]
    ckpt = load_torch_checkpoint(out / "ckpt_last.pt")
    assert ckpt.model == "bigram" and list(ckpt.params) == ["token_embedding_table.weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_matches_explicit_attention_float32(bias):
    """The fast path (F.scaled_dot_product_attention) and the written-out one, float32 on the CPU:
    logits and every gradient. From the first attention on the two round differently, so every later
    stage of the 2-layer forward and backward adds its own rounding: a chain over the whole model."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=bias)
    sdpa = GPT(cfg, attention="sdpa")
    explicit = GPT(cfg, attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 23, (3, 16))
    targets = torch.randint(0, 23, (3, 16))
    outs = {}
    for name, model in (("sdpa", sdpa), ("explicit", explicit)):
        logits, loss = model(idx, targets)
        loss.backward()
        outs[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    # the longest sum: the MLP's projection (4 C terms) or a weight gradient over the batch's positions;
    # the stages of a 2-layer model: PARITY_DEPTH for forward and backward, half of them forward
    n = max(4 * cfg.n_embd, 3 * cfg.block_size)
    forward = bounds.chain(np.float32, n, bounds.PARITY_DEPTH // 2, bounds.PARITY_AMPLIFICATION)
    backward = bounds.chain(np.float32, n, bounds.PARITY_DEPTH, bounds.PARITY_AMPLIFICATION)
    check("logits", outs["sdpa"][0], outs["explicit"][0], forward)
    for name, g in outs["explicit"][1].items():
        check(f"grad {name}", outs["sdpa"][1][name], g, backward)


def test_device_batches_are_windows_of_the_data():
    data = np.arange(1000) % 97
    b = DeviceBatches(data, batch_size=4, block_size=8, device=torch.device("cpu"), seed=3)
    x, y = b.get()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.all((x[:, 1:] - x[:, :-1]) % 97 == 1), "rows are not consecutive windows"
    assert torch.equal(y, (x + 1) % 97), "targets are not the inputs shifted by one"
    # the same seed, the same batches; the ranks of a 2-process run split one 2B batch between them
    whole = DeviceBatches(data, 8, 8, torch.device("cpu"), seed=5).get()[0]
    halves = [DeviceBatches(data, 4, 8, torch.device("cpu"), seed=5, rank=r, world_size=2).get()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0], halves[1])


def test_device_and_dtype_choice():
    cpu = pick_device("cpu")
    assert cpu.type == "cpu" and pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")

