"""The PyTorch backend: torchgpt on cpu, cuda or mps, one process or DDP under torchrun.

On a GPU: bf16 autocast, TF32, SDPA (flash) attention, fused AdamW, torch.compile, batches drawn
on the device. The host reads a number back only when the loop asks for one: the loss on log
steps, the eval losses, and `poll` (a stop or a non-finite loss) on eval steps, the last step and
the step after each log step; on a CPU that costs nothing, so `poll` checks every step
(docs/training.md, "Where the host waits").
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
import sys
import time

import torch

from torchgpt.convert import load_params
from torchgpt.model import GPT, BigramLanguageModel, configure_muon_adamw
from torchgpt.runtime import (
    DeviceBatches,
    DeviceError,
    LossWatch,
    all_sum,
    autocast,
    dist_env,
    gather_rng_states,
    init_distributed,
    load_optimizer_state,
    peak_flops,
    pick_device,
    pick_dtype,
    restore_generator_state,
    set_rng_state,
    set_tf32,
    shutdown_distributed,
    sync_flags,
    wrap_ddp,
)

from ..backend import (BackendInfo, Built, TrainingState, eval_seed, local_accumulation_steps, model_vocab_size,
                       restore_or_refuse)
from ..checkpoint import NUMPY_EXT, TORCH_EXT, Checkpoint, CheckpointError, load_checkpoint
from ..errors import UsageError, one_line
from ..torch_checkpoint import check_optimizer_state, load_torch_checkpoint, save_run_checkpoint


def device_from_flag(request: str, local_rank: int | None = None, world_size: int | None = None) -> torch.device:
    try:
        return pick_device(request, local_rank, world_size)
    except DeviceError as err:
        raise UsageError(str(err)) from None


def read_any_checkpoint(path) -> Checkpoint:
    return load_checkpoint(path, torch_loader=load_torch_checkpoint)


def model_from_checkpoint(ckpt: Checkpoint, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model on `device`, in eval mode."""
    model = BigramLanguageModel(ckpt.vocab_size) if ckpt.model == "bigram" else GPT(ckpt.gpt_config)
    load_params(model, ckpt.params)
    return model.to(device).eval()


def sample_model(ckpt: Checkpoint, device: torch.device):
    """(generate, block_size) of the checkpoint's model on `device`, with full float32 matmuls."""
    set_tf32(False)  # the same logits, so the same text, as train_np.py
    model = model_from_checkpoint(ckpt, device)
    generate = lambda ids, n, **kw: model.generate(ids, n, **kw).cpu().numpy()  # noqa: E731
    return generate, (ckpt.gpt_config.block_size if ckpt.model == "gpt" else None)


def accumulate_gradients(train_model: torch.nn.Module, batches: DeviceBatches, micro_steps: int, amp,
                         ddp: bool) -> torch.Tensor:
    """Forward and backward over `micro_steps` micro-batches, leaving in .grad the gradient of their
    mean loss; returns that mean loss, detached (still on the device).

    Each micro-batch's loss is divided by micro_steps before its backward, so the gradients add up
    to the mean (nanoGPT's rule); one micro-step is the plain loss.backward(). Under DDP the
    gradients are all-reduced (averaged over the ranks) only in the last micro-step's backward.
    """
    total = None
    for k in range(micro_steps):
        x, y = batches.get()  # (B, T) each, on the device
        last = k == micro_steps - 1
        with contextlib.nullcontext() if last or not ddp else train_model.no_sync():
            with amp:
                _, loss = train_model(x, y)
            (loss if micro_steps == 1 else loss / micro_steps).backward()
        loss = loss.detach()
        total = loss if total is None else total + loss
    return total if micro_steps == 1 else total / micro_steps


INFO = BackendInfo(name="torch", label="torchgpt", prog="train_torch.py", ext=TORCH_EXT, other_prog="train_np.py",
                   other_ext=NUMPY_EXT, write=save_run_checkpoint)


@dataclass(frozen=True)
class TorchOptions:
    """train_torch.py's own flags."""

    device: str = "auto"          # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"           # auto, float32 or bfloat16
    compile: bool | None = None   # None: on for CUDA, off elsewhere
    attention: str = "sdpa"       # sdpa or explicit


class TorchBackend:
    """torchgpt under the loop; every rank of a DDP run runs the same calls."""

    info = INFO

    def __init__(self, options: TorchOptions = TorchOptions()):
        self.dist = dist_env()
        self.device = device_from_flag(options.device, self.dist.local_rank, self.dist.world_size)
        self.default_preset = "shakespeare-char" if self.device.type == "cuda" else "cpu"
        try:
            self.dtype = pick_dtype(options.dtype, self.device)
        except DeviceError as err:
            raise UsageError(str(err)) from None
        self.use_compile = options.compile if options.compile is not None else self.device.type == "cuda"
        self.attention = options.attention

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def read_checkpoint(self, path, any_kind: bool) -> Checkpoint:
        return read_any_checkpoint(path) if any_kind else load_torch_checkpoint(path)

    @contextlib.contextmanager
    def session(self):
        """The DDP process group, if any: joined before the model is built, left by every rank together."""
        self.dist = init_distributed(self.dist, self.device)
        try:
            yield
            if self.dist.enabled:  # rank 0 may still be sampling: leave together, or gloo aborts the early rank
                torch.distributed.barrier()
        finally:
            if self.dist.enabled:
                # The DDP wrapper sits in a reference cycle: left to the garbage collector, it (and its
                # reducer's hold on the process group) can outlive destroy_process_group and be freed
                # during interpreter shutdown, a known cause of "terminate called without an active
                # exception". Drop it and collect here, while the group still exists.
                self.train_model = None
                gc.collect()
            shutdown_distributed(self.dist)

    def build(self, cfg, tokenizer, train_data, val_data, ckpt, resume: bool) -> Built:
        device, info = self.device, self.dist
        self.cfg = cfg
        if device.type == "cuda":
            set_tf32(True)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        vocab_size = model_vocab_size(tokenizer, ckpt)
        raw = (BigramLanguageModel(vocab_size) if cfg.model == "bigram"
               else GPT(cfg.gpt_config(vocab_size), attention=self.attention))
        if ckpt is not None:
            try:
                load_params(raw, ckpt.params)
            except ValueError as err:
                raise CheckpointError(f"{ckpt.path}: {one_line(err)}") from None
        raw.to(device)
        self.raw = raw
        if cfg.optimizer == "muon":  # torch.optim.Muon for the block matrices, AdamW for the rest
            try:
                self.optimizer = configure_muon_adamw(raw, cfg.weight_decay, cfg.learning_rate, cfg.muon_lr,
                                                      (cfg.beta1, cfg.beta2), device.type, cfg.muon_ns_dtype)
            except RuntimeError as err:  # a torch without torch.optim.Muon
                raise UsageError(str(err)) from None
        else:
            self.optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                                      device.type)
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout: a different stream on every rank
        self.batches = {"train": DeviceBatches(train_data, cfg.batch_size, cfg.block_size, device, cfg.seed,
                                               info.rank, info.world_size),
                        "val": DeviceBatches(val_data, cfg.batch_size, cfg.block_size, device, cfg.seed + 1,
                                             info.rank, info.world_size)}
        self.model = torch.compile(raw) if self.use_compile else raw
        self.train_model = wrap_ddp(self.model, device, info)
        self.amp = autocast(device, self.dtype)
        # nanoGPT's rule: --gradient_accumulation_steps counts the micro-batches of the global batch,
        # shared among the ranks, so the tokens of a step do not grow with the number of processes
        self.micro_steps = local_accumulation_steps(cfg.gradient_accumulation_steps, info.world_size)
        self.loss_watch = LossWatch(device, capacity=cfg.log_interval + 2)  # non-finite losses, read by poll()
        self.check_every_step = device.type == "cpu"  # reading a flag costs nothing there; on a GPU it is a sync
        if resume:
            restore_or_refuse(ckpt, lambda: self._restore(ckpt))
        peak = peak_flops(device) if isinstance(raw, GPT) else None
        # of this process's GPU: its micro-batches of a step (batch_size each)
        peak_step_s = raw.estimate_mfu(cfg.batch_size * self.micro_steps, 1.0, peak) if peak else None
        attention = self.attention if isinstance(raw, GPT) else "-"
        banner = (f"device {self.device}, dtype {str(self.dtype).replace('torch.', '')}, compile "
                  f"{'on' if self.use_compile else 'off'}, attention {attention}, world size {self.world_size}",)
        return Built(num_params=sum(p.numel() for p in raw.parameters()), banner=banner,
                     compile_s=self._warm_up(), peak_step_s=peak_step_s)

    def _restore(self, ckpt: Checkpoint) -> None:
        check_optimizer_state(self.optimizer, ckpt.optimizer, ckpt.path)  # torch checks only the group sizes
        # The saved param_groups carry the hyperparameters of the run that wrote them; this run's come
        # from its settings (the checkpoint's, with the flags given on --resume): put them back after
        # the load, so --weight_decay, --beta1, --beta2, --learning_rate and --muon_lr apply.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        load_optimizer_state(self.optimizer, ckpt.optimizer)
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        note = restore_generator_state(self.batches["train"].generator, ckpt.rng["data"])
        if note and self.dist.is_main:  # saved on another device type (a GPU run resumed on a CPU, or back)
            print(f"note: {ckpt.path}: {note}", file=sys.stderr)
        same_world = set_rng_state(ckpt.rng["per_rank"], self.device, self.dist)
        if not same_world and self.dist.is_main:
            print(f"note: {ckpt.path} was saved by {len(ckpt.rng['per_rank'])} process(es), this run has "
                  f"{self.dist.world_size}; dropout streams start afresh", file=sys.stderr)

    @torch.no_grad()
    def evaluate(self, it: int, stop=None) -> dict | None:
        """Mean loss over eval_iters batches of each split (see loop.eval_seed), in eval mode; None as
        soon as stop() is true between two batches (one process only: under DDP every rank must reach
        the all-reduce, so the evaluation ends first and the loop's poll stops the ranks together).

        Under DDP the ranks split the batches (DeviceBatches.rank_share: each evaluates about
        eval_iters / world_size of them) and the sum is all-reduced, so evaluating takes 1/world_size
        of the time and gives the mean of the same eval_iters batches one process would see.
        One host sync per split (the .item()).
        """
        cfg = self.cfg
        if self.dist.enabled:
            stop = None
        self.model.eval()
        try:
            out = {}
            for k, (name, batches) in enumerate(self.batches.items()):
                gen = batches.new_generator(eval_seed(cfg.seed, it, k))
                total = torch.zeros((), dtype=torch.float32, device=batches.device)
                for x, y in batches.rank_share(gen, cfg.eval_iters):
                    if stop is not None and stop():
                        return None
                    with self.amp:
                        _, loss = self.model(x, y)
                    total += loss.float()
                out[name] = all_sum(total, self.dist).item() / cfg.eval_iters
            return out
        finally:
            self.model.train()

    def _warm_up(self) -> float | None:
        """Compile the training and evaluation graphs before step 0, and return the seconds it took
        (None without --compile): compilation then lands in neither a step's time nor "train s".

        One forward and backward of a training step's micro-batches and one evaluation forward; then
        the gradients are dropped and the data stream and dropout RNG states put back, so the run
        goes on as it would without this (the optimiser never stepped).
        """
        if not self.use_compile:
            return None
        t0 = time.perf_counter()
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        batches = self.batches["train"]
        data_state = batches.generator.get_state()
        accumulate_gradients(self.train_model, batches, self.micro_steps, self.amp, self.dist.enabled)
        self.optimizer.zero_grad(set_to_none=True)
        batches.generator.set_state(data_state)
        self.model.eval()
        with torch.no_grad(), self.amp:
            self.model(*batches.get(batches.new_generator(0)))
        self.model.train()
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def step(self, it: int, lr: float, log: bool) -> float | None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / learning_rate
        loss = accumulate_gradients(self.train_model, self.batches["train"], self.micro_steps, self.amp,
                                    self.dist.enabled)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_watch.add(it, loss)  # one copy kernel, no sync: poll() reads it
        return loss.float().item() if log else None  # the one sync of a log step

    def poll(self, stop_requested: bool, force: bool) -> tuple[bool, int]:
        if self.check_every_step or force:  # a host sync (sync_flags): the same answer on every rank
            return sync_flags(stop_requested, self.loss_watch.first_bad_step(), self.dist)
        return False, -1

    def state(self) -> TrainingState | None:
        """Every rank calls this (the RNG states are gathered); rank 0 gets the state, the others None."""
        per_rank = gather_rng_states(self.device, self.dist)
        if not self.dist.is_main:
            return None
        return TrainingState(params={k: v.detach() for k, v in self.raw.state_dict().items()},
                             optimizer=self.optimizer.state_dict(),
                             rng={"data": self.batches["train"].generator.get_state(), "per_rank": per_rank,
                                  "world_size": self.dist.world_size})

    def generator(self):
        raw = self.raw.eval()
        return lambda ids, n, **kw: raw.generate(ids, n, **kw).cpu().numpy()
