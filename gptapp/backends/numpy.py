"""The NumPy backend: npgpt's fast path (npgpt.fast) by default, the plain reference layers with
--reference (the same numbers in float64, slower). Reading a .pt checkpoint imports torch; nothing
else here does.
"""
from __future__ import annotations

import math

import numpy as np

from npgpt.data import get_batch

from ..backend import BackendInfo, Built, TrainingState, eval_seed, model_vocab_size, restore_or_refuse
from ..checkpoint import NUMPY_EXT, TORCH_EXT, Checkpoint, CheckpointError, load_checkpoint, save_npz
from ..errors import INSTALL_TORCH
from ..optimizers import MuonAdamW


def model_classes(reference: bool):
    """(GPT, BigramLanguageModel, AdamW, clip_grad_norm): the plain layers, or the fast path beside them."""
    if reference:
        import npgpt
        from npgpt.optim import AdamW, clip_grad_norm
        return npgpt.GPT, npgpt.BigramLanguageModel, AdamW, clip_grad_norm
    from npgpt import fast
    return fast.GPT, fast.BigramLanguageModel, fast.AdamW, fast.clip_grad_norm


def muon_class(reference: bool):
    """npgpt.optim.Muon, or npgpt.fast.Muon (the same update bit for bit, its iteration in place)."""
    if reference:
        from npgpt.optim import Muon
        return Muon
    from npgpt.fast import Muon
    return Muon


def torch_loader(path) -> Checkpoint:
    """Read a .pt (ours or nanoGPT's); torch is imported only here."""
    try:
        from ..torch_checkpoint import load_torch_checkpoint
    except ImportError as err:
        raise CheckpointError(f"{path} is a PyTorch checkpoint and reading it needs torch ({err}); "
                              f"{INSTALL_TORCH}, or use a .npz checkpoint") from None
    return load_torch_checkpoint(path)


def read_any_checkpoint(path) -> Checkpoint:
    return load_checkpoint(path, torch_loader=torch_loader)


def load_params_into(model, params: dict) -> None:
    """Copy in place: the optimiser holds references to the model's arrays."""
    for name, p in model.params.items():
        p[...] = params[name]


def model_from_checkpoint(ckpt: Checkpoint, reference: bool = False):
    """The checkpoint's model (fast path, or the reference layers), in eval mode."""
    GPT, BigramLanguageModel, _, _ = model_classes(reference)
    model = BigramLanguageModel(ckpt.vocab_size) if ckpt.model == "bigram" else GPT(ckpt.gpt_config)
    load_params_into(model, ckpt.params)
    return model.eval()


def sample_model(ckpt: Checkpoint, reference: bool = False):
    """(generate, block_size) of the checkpoint's model."""
    model = model_from_checkpoint(ckpt, reference)
    return model.generate, (ckpt.gpt_config.block_size if ckpt.model == "gpt" else None)


def accumulate_gradients(model, next_batch, micro_steps: int) -> tuple[dict, list[float]]:
    """(gradient of the mean loss over `micro_steps` micro-batches, their losses), as the torch
    backend's accumulate_gradients: the micro-batch gradients summed, then divided by micro_steps.
    `next_batch()` gives each (x, y). Stops at the first non-finite loss (its backward is never run)."""
    total, losses = None, []
    for _ in range(micro_steps):
        _, loss = model.forward(*next_batch())
        losses.append(loss)
        if not math.isfinite(loss):
            break
        grads = model.backward()
        if micro_steps == 1:
            total = grads
        elif total is None:
            total = {name: g.copy() for name, g in grads.items()}  # the next backward may reuse its arrays
        else:
            for name, g in grads.items():
                total[name] += g
    if micro_steps > 1 and total is not None:
        for g in total.values():
            g /= micro_steps
    return total, losses


INFO = BackendInfo(name="numpy", label="npgpt", prog="train_np.py", ext=NUMPY_EXT, other_prog="train_torch.py",
                   other_ext=TORCH_EXT, write=save_npz)


class NumpyBackend:
    """One process, float32 NumPy; the data stream and dropout draw from NumPy generators."""

    info, is_main, world_size, default_preset, device, attention = INFO, True, 1, "cpu", "cpu", "explicit"

    def __init__(self, reference: bool = False):
        self.reference = reference
        self.first_bad = -1  # the first step with a non-finite loss, or -1

    def read_checkpoint(self, path, any_kind: bool) -> Checkpoint:
        return read_any_checkpoint(path) if any_kind else load_checkpoint(path)  # .npz only to resume

    def session(self):
        # overflow warnings are not errors here: a loss that stops being finite is (poll reports it)
        return np.errstate(over="ignore", invalid="ignore", divide="ignore")

    def build(self, cfg, tokenizer, train_data, val_data, ckpt, resume: bool) -> Built:
        GPT, BigramLanguageModel, AdamW, self.clip_grad_norm = model_classes(self.reference)
        self.cfg = cfg
        vocab_size = model_vocab_size(tokenizer, ckpt)
        self.model = (BigramLanguageModel(vocab_size, seed=cfg.seed) if cfg.model == "bigram"
                      else GPT(cfg.gpt_config(vocab_size), seed=cfg.seed))
        if ckpt is not None:
            load_params_into(self.model, ckpt.params)
        if cfg.optimizer == "muon":  # Muon for the block matrices, AdamW for the rest
            self.optimizer = MuonAdamW(self.model.params, AdamW, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                       weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr,
                                       muon_class=muon_class(self.reference))
        else:
            self.optimizer = AdamW(self.model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                   weight_decay=cfg.weight_decay)
        self.data_rng = np.random.default_rng(cfg.seed)
        self.splits = {"train": train_data, "val": val_data}
        if resume:
            restore_or_refuse(ckpt, lambda: self._restore(ckpt))
        return Built(num_params=self.model.num_params())

    def _restore(self, ckpt: Checkpoint) -> None:
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.data_rng.bit_generator.state = ckpt.rng["data"]
        if self.cfg.model == "gpt":
            self.model.rng.bit_generator.state = ckpt.rng["dropout"]

    def evaluate(self, it: int, stop=None) -> dict | None:
        """Mean loss over eval_iters batches of each split (see backend.eval_seed), in eval mode (no
        dropout); None as soon as stop() is true between two batches."""
        cfg = self.cfg
        self.model.eval()
        try:
            out = {}
            for k, (name, data) in enumerate(self.splits.items()):
                rng = np.random.default_rng(eval_seed(cfg.seed, it, k))
                losses = []
                for _ in range(cfg.eval_iters):
                    if stop is not None and stop():
                        return None
                    losses.append(self.model.forward(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1])
                out[name] = float(np.mean(losses))
            return out
        finally:
            self.model.train()

    def step(self, it: int, lr: float, log: bool) -> float | None:
        cfg = self.cfg
        next_batch = lambda: get_batch(self.splits["train"], cfg.batch_size, cfg.block_size, self.data_rng)  # noqa: E731
        grads, losses = accumulate_gradients(self.model, next_batch, cfg.gradient_accumulation_steps)
        if not math.isfinite(losses[-1]):
            # no update: the weights stay those of the last good step
            self.first_bad = it if self.first_bad < 0 else self.first_bad
        else:
            if cfg.grad_clip > 0:
                self.clip_grad_norm(grads, cfg.grad_clip)
            self.optimizer.step(grads, lr=lr)
        loss = losses[0] if len(losses) == 1 else sum(losses) / len(losses)
        return float(loss) if log else None

    def poll(self, stop_requested: bool, force: bool) -> tuple[bool, int]:
        return stop_requested, self.first_bad

    def state(self) -> TrainingState:
        gpt = self.cfg.model == "gpt"
        return TrainingState(params=self.model.params, optimizer=self.optimizer.state_dict(),
                             rng={"data": self.data_rng.bit_generator.state,
                                  "dropout": self.model.rng.bit_generator.state if gpt else None})

    def generator(self):
        self.model.eval()
        return self.model.generate
