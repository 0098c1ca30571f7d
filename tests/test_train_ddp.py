"""DistributedDataParallel on the CPU (gloo, 127.0.0.1): two processes, each on its own half of a
batch, end a backward with the gradients of one process on the whole batch (float64, 1e-12); and
train_torch.py itself under torchrun with two processes."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import torch
from test_train_helpers import ROOT, SUBPROCESS_ENV, check, needs_data, tiny_args

from npgpt.config import GPTConfig
from torchgpt.model import GPT
from gptapp.torch_checkpoint import load_torch_checkpoint
from torchgpt.runtime import DeviceBatches

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
B_PER_RANK = 4

# One rank: the model, the batch and the DDP wrapper exactly as train_torch.py builds them.
WORKER = textwrap.dedent(f"""
    import sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from npgpt.config import GPTConfig
    from torchgpt.model import GPT
    from torchgpt.runtime import DeviceBatches, dist_env, init_distributed, shutdown_distributed, wrap_ddp
    cpu = torch.device("cpu")
    info = init_distributed(dist_env(), cpu)
    assert info.backend == "gloo" and info.world_size == 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{CFG!r})).double()
    torch.manual_seed(100 + info.rank)  # different weights before wrapping: DDP must broadcast rank 0's
    if info.rank:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    data = np.random.default_rng(0).integers(0, {CFG['vocab_size']}, size=500)
    x, y = DeviceBatches(data, {B_PER_RANK}, {CFG['block_size']}, cpu, seed=5, rank=info.rank,
                         world_size=info.world_size).get()
    ddp = wrap_ddp(model, cpu, info)
    _, loss = ddp(x, y)
    loss.backward()
    torch.save({{"x": x, "y": y, "grads": {{n: p.grad for n, p in model.named_parameters()}}}}, sys.argv[1])
    shutdown_distributed(info)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(port: int, **extra) -> dict:
    return {**SUBPROCESS_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            **extra}


def test_two_process_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"rank{r}.pt")], cwd=ROOT,
                              env=ddp_env(port, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    data = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=500)
    x, y = DeviceBatches(data, 2 * B_PER_RANK, CFG["block_size"], torch.device("cpu"), seed=5).get()
    assert torch.equal(torch.cat([ranks[0]["x"], ranks[1]["x"]]), x), "the ranks did not split one batch"
    assert not torch.equal(ranks[0]["x"], ranks[1]["x"]), "both ranks drew the same batch"
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        for r in (0, 1):
            check(f"rank {r} {name}", ranks[r]["grads"][name], p.grad, 1e-12)


@needs_data
def test_train_torch_under_torchrun(tmp_path):
    """Two CPU processes: only rank 0 logs and saves; the checkpoint carries both ranks' RNG state."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "train_torch.py"),
           *map(str, tiny_args(out, "--max_iters", 10, "--eval_interval", 10, "--device", "cpu"))]
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
