"""Two-process DDP runs on the CPU (gloo, 127.0.0.1) for tests/test_train_ddp.py and
tests/test_reliability.py: the model and batch of one rank (CFG, B_PER_RANK), one rank's run
(rank_run, also the body of the worker script each process starts), a free port and the
environment torchrun would give a rank."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import torch
from train_helpers import ROOT, SUBPROCESS_ENV

from gptapp.backends.torch import accumulate_gradients as torch_accumulate
from npgpt.config import GPTConfig
from torchgpt.model import GPT
from torchgpt.runtime import DeviceBatches

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
B_PER_RANK = 4


def rank_run(path, accumulation: int) -> None:
    """One rank of a run as train_torch.py builds it (or the one process, without torchrun's
    environment), in float64; saves to `path` what each of three parts drew and computed:

    1. a DDP step on this rank's share of one batch, rank 1's weights changed before wrapping (DDP
       must broadcast rank 0's);
    2. a step of `accumulation` micro-batches (--gradient_accumulation_steps, shared among the
       ranks) through the torch backend's own accumulate_gradients;
    3. that backend's evaluate, eval_iters=5 shared among the ranks.
    """
    from dataclasses import replace

    from gptapp.backends.torch import TorchBackend, TorchOptions
    from gptapp.settings import PRESETS
    from npgpt.data import CharTokenizer, train_val_split
    from torchgpt.runtime import dist_env, init_distributed, shutdown_distributed, wrap_ddp

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    info = init_distributed(dist_env(), cpu)
    world = info.world_size
    data = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=500)

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    torch.manual_seed(100 + info.rank)
    if info.rank:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    x, y = DeviceBatches(data, B_PER_RANK, CFG["block_size"], cpu, seed=5, rank=info.rank, world_size=world).get()
    ddp = wrap_ddp(model, cpu, info)  # held until backward has run: its hooks do the all-reduce
    _, loss = ddp(x, y)
    loss.backward()
    step = {"x": x, "y": y, "grads": {n: p.grad for n, p in model.named_parameters()}}

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    batches = DeviceBatches(data, B_PER_RANK, CFG["block_size"], cpu, seed=5, rank=info.rank, world_size=world)
    drawn, get = [], batches.get
    batches.get = lambda *a: drawn.append(get(*a)) or drawn[-1]
    loss = torch_accumulate(wrap_ddp(model, cpu, info), batches, accumulation // world, contextlib.nullcontext(),
                            info.enabled)

    text = "".join(np.random.default_rng(1).choice(list("abcdefgh \n"), size=3000))
    tok = CharTokenizer.from_text(text)
    train, val = train_val_split(tok.encode(text))
    backend = TorchBackend(TorchOptions(device="cpu", dtype="float32", compile=False, attention="sdpa"))
    backend.dist = info
    backend.build(replace(PRESETS["tiny"], eval_iters=5, gradient_accumulation_steps=2), tok, train, val, None,
                  resume=False)
    backend.raw.double()
    forwards = []
    backend.raw.register_forward_hook(lambda *a: forwards.append(1))
    losses = backend.evaluate(20)
    torch.save({"step": step, "x": [x for x, _ in drawn], "y": [y for _, y in drawn], "loss": loss,
                "losses": losses, "forwards": len(forwards),
                "grads": {n: p.grad for n, p in model.named_parameters()}}, path)
    shutdown_distributed(info)


# A rank's process: rank_run from this module, as torchrun would start it.
WORKER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(ROOT / "tests")!r})
    from ddp_helpers import rank_run
    rank_run(sys.argv[1], int(sys.argv[2]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_env(port: int, **extra) -> dict:
    return {**SUBPROCESS_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            **extra}


def run_ranks(tmp_path, world: int, *args) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"rank{r}.pt"), *map(str, args)],
                              cwd=ROOT, env=ddp_env(port, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
