"""What a run will need, estimated from its settings before anything is built, against what the
machine has: a run that cannot fit is refused in one line naming the flag to lower, not killed for
memory halfway through building its model.

Dimension letters as in npgpt/layers.py: B batch_size, T block_size, C n_embd, L n_layer, nh n_head,
hs head size, H the MLP's hidden width (F = H, or 2H for swiglu's gate and up rows), V vocab_size,
P the parameter count. Every count is a Python int: absurd settings give absurd numbers, never an
overflow. Sizes are bytes, float32 (4 bytes) for both backends: npgpt.fast and torchgpt hold float32
weights, and torch's bf16 autocast only shrinks what this counts.

The memory of one training step:
    weights      P * 4 * (1 + 1 + 2)   the parameters, their gradients, AdamW's two moments (Muon keeps
                                       one buffer per matrix: fewer)
    activations  what one step's forward keeps for its backward (npgpt's caches, torch's saved
                 tensors: the same tensors), plus the gradients of one block during the backward
    attention    the (B, nh, T, T) attention probabilities and their dropout mask, per block: the
                 one term that grows as T^2 (torch's flash attention on CUDA keeps (B, nh, T) only)
Evaluation runs the same forward on batches of the same (B, T) without the backward, so its
activations are at most a step's: the peak is the step's.

The time of one step (or one evaluation) is bounded too: a stop is honoured between steps, so a
step that would take hours leaves no way to stop the run but killing it. FLOPs per token as nanoGPT
counts them (PaLM, appendix B): 6 P for the weights, 12 L C T for attention.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .errors import UsageError

FLOAT_BYTES = 4
# One step or one evaluation may not take longer than this at the rate below: an hour of work
# between two chances to stop.
MAX_STEP_SECONDS = 3600.0
# Rates no machine this app runs on beats (FLOP/s): far above a CPU's, about a top GPU's dense bf16.
OPTIMISTIC_FLOPS = {"cpu": 5e12, "cuda": 2e15, "mps": 1e14}
# The flags whose smallest value the estimate is tried with, to name the one that drives it.
SIZE_FLAGS = ("batch_size", "block_size", "n_layer", "n_embd", "mlp_hidden", "eval_iters",
              "gradient_accumulation_steps")


class BudgetError(UsageError):
    """Settings that need more memory or time than the machine has; the message is one line."""


# --------------------------------------------------------------------------- parameters

def _block_tensors(c: GPTConfig) -> dict[str, int]:
    """One block's parameter tensors -> their element counts (npgpt.model.param_shapes, in closed form)."""
    C, F, hs = c.n_embd, (2 if c.activation == "swiglu" else 1) * c.mlp_hidden_size, c.head_size
    norm_bias = c.bias and c.norm == "layernorm"  # RMSNorm has no bias
    sizes = {
        "ln_1.weight": C, "attn.c_attn.weight": 3 * C * C, "attn.c_proj.weight": C * C,
        "ln_2.weight": C, "mlp.c_fc.weight": F * C, "mlp.c_proj.weight": C * c.mlp_hidden_size,
    }
    if norm_bias:
        sizes.update({"ln_1.bias": C, "ln_2.bias": C})
    if c.bias:
        sizes.update({"attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C, "mlp.c_fc.bias": F, "mlp.c_proj.bias": C})
    if c.qk_norm:
        sizes.update({"attn.q_norm.weight": hs, "attn.k_norm.weight": hs})
    return sizes


def _outer_tensors(c: GPTConfig) -> dict[str, int]:
    """The tensors outside the blocks -> their element counts."""
    V, C = c.vocab_size, c.n_embd
    sizes = {"transformer.wte.weight": V * C, "transformer.ln_f.weight": C}
    if c.pos_emb == "learned":
        sizes["transformer.wpe.weight"] = c.block_size * C
    if c.bias and c.norm == "layernorm":
        sizes["transformer.ln_f.bias"] = C
    if not c.tie_weights:
        sizes["lm_head.weight"] = V * C
    return sizes


def parameter_count(config: GPTConfig) -> int:
    """P: the elements of npgpt.model.param_shapes(config), in O(1) whatever n_layer is."""
    return config.n_layer * sum(_block_tensors(config).values()) + sum(_outer_tensors(config).values())


def parameter_tensor_count(config: GPTConfig) -> int:
    """len(npgpt.model.param_shapes(config)), in O(1)."""
    return config.n_layer * len(_block_tensors(config)) + len(_outer_tensors(config))


# --------------------------------------------------------------------------- one step

@dataclass(frozen=True)
class Estimate:
    weights: int      # bytes: parameters, gradients, optimizer state
    activations: int  # bytes: a step's activations and one block's gradients, the T^2 term excluded
    attention: int    # bytes: the (B, nh, T, T) probabilities (and dropout mask) of every block
    step_flops: int   # one optimisation step (all its micro-batches)
    eval_flops: int   # one evaluation (eval_iters batches of each split, forward only)

    @property
    def memory(self) -> int:
        return self.weights + self.activations + self.attention


def estimate(cfg, vocab_size: int, flash_attention: bool = False) -> Estimate:
    """The memory and work of one step of a run with TrainConfig `cfg` and a vocabulary of `vocab_size`.

    flash_attention: torch's SDPA on CUDA, which never materialises the (T, T) probabilities.
    """
    B, T, V = cfg.batch_size, cfg.block_size, vocab_size
    if cfg.model == "bigram":
        P = V * V
        activations = 3 * B * T * V * FLOAT_BYTES  # logits, probabilities, their gradient: (B, T, V) each
        flops = 6 * P * B * T  # a lookup forward, but count it as a matmul: an upper bound
        return Estimate(4 * P * FLOAT_BYTES, activations, 0, flops * cfg.gradient_accumulation_steps,
                        2 * cfg.eval_iters * flops // 3)
    c = cfg.gpt_config(V)
    C, L, nh, H = c.n_embd, c.n_layer, c.n_head, c.mlp_hidden_size
    F = 2 * H if c.activation == "swiglu" else H
    P = parameter_count(c)
    # per block, the tensors its forward keeps (elements):
    #   ln_1 input and normalised output        2 (B, T, C)
    #   c_attn output q, k, v                   3 (B, T, C)
    #   attention output, c_proj output         2 (B, T, C)
    #   the residual sum                        1 (B, T, C)
    #   ln_2 input and normalised output        2 (B, T, C)
    #   c_fc output, the activation's output    (B, T, F) + (B, T, H)
    #   mlp c_proj output                       1 (B, T, C)   (the next residual is the next block's input)
    per_block = B * T * (10 * C + F + H)
    # the attention probabilities and their dropout mask: 2 (B, nh, T, T); flash keeps (B, nh, T)
    per_block_attention = 2 * B * nh * T * (1 if flash_attention else T)
    # outside the blocks: the embeddings' sum (B, T, C), ln_f 2 (B, T, C), and the logits, their
    # softmax and its gradient 3 (B, T, V)
    outer = B * T * (3 * C + 3 * V)
    # during the backward, the gradients of one block's activations besides the caches
    activations = (L + 1) * per_block + outer
    attention = (L + 1) * per_block_attention
    flops_per_token = 6 * P + 12 * L * C * T  # forward and backward
    forward_flops = flops_per_token * B * T // 3
    return Estimate(weights=4 * P * FLOAT_BYTES, activations=activations * FLOAT_BYTES,
                    attention=attention * FLOAT_BYTES,
                    step_flops=3 * forward_flops * cfg.gradient_accumulation_steps,
                    eval_flops=2 * cfg.eval_iters * forward_flops)


# --------------------------------------------------------------------------- the machine

def available_memory(device: str = "cpu") -> int | None:
    """Bytes a run can still take: the device's free memory on CUDA, else the host's MemAvailable
    (capped by this cgroup's limit, where one is set). None where neither can be read."""
    if device.startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # no torch, no such device: the host's memory is the best guess
            pass
    host = _meminfo_available()
    limit = _cgroup_room()
    return host if limit is None else limit if host is None else min(host, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None where there is no limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            top = f.read().strip()
        if top == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(top) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the check

def check_training_budget(cfg, vocab_size: int, backend: str = "numpy", device: str = "cpu",
                          attention: str = "explicit", available: int | None = None) -> Estimate:
    """BudgetError (one line: the estimate, what is available, the flag to lower) unless one step of
    `cfg` fits the machine's memory and one step or evaluation ends within MAX_STEP_SECONDS.
    `available` overrides the machine's free memory (bytes)."""
    device = str(device)
    flash = backend == "torch" and device.startswith("cuda") and attention == "sdpa"
    est = estimate(cfg, vocab_size, flash)
    if available is None:
        available = available_memory(device if backend == "torch" else "cpu")
    if available is not None and est.memory > available:
        flag = _driving_flag(cfg, vocab_size, flash, lambda e: e.memory)
        most = max((est.weights, "the parameters, their gradients and the optimizer state"),
                   (est.activations, "one step's activations"),
                   (est.attention, "the attention probabilities, (B, nh, T, T) per block"))[1]
        raise BudgetError(f"{_flag_value(cfg, flag)} needs ~{format_bytes(est.memory)} of memory, most of it for "
                          f"{most}; {format_bytes(available)} are available: lower --{flag}")
    rate = OPTIMISTIC_FLOPS.get(device.split(":")[0] if backend == "torch" else "cpu", OPTIMISTIC_FLOPS["cpu"])
    limit = MAX_STEP_SECONDS * rate
    if max(est.step_flops, est.eval_flops) > limit:
        what = "one step" if est.step_flops >= est.eval_flops else "one evaluation"
        flag = _driving_flag(cfg, vocab_size, flash, lambda e: max(e.step_flops, e.eval_flops))
        raise BudgetError(f"{_flag_value(cfg, flag)} makes {what} ~{max(est.step_flops, est.eval_flops):.1e} "
                          f"floating-point operations, over {MAX_STEP_SECONDS / 3600:g} hour even at {rate:.0e} "
                          f"FLOP/s, and a stop waits for it: lower --{flag}")
    return est


def _driving_flag(cfg, vocab_size: int, flash: bool, measure) -> str:
    """The size flag whose smallest value shrinks `measure` of the estimate most."""
    smallest = {"n_embd": cfg.n_head, "mlp_hidden": 1}
    best, best_value = SIZE_FLAGS[0], None
    for name in SIZE_FLAGS:
        if cfg.model == "bigram" and name not in ("batch_size", "block_size", "eval_iters",
                                                  "gradient_accumulation_steps"):
            continue
        try:
            value = measure(estimate(replace(cfg, **{name: smallest.get(name, 1)}), vocab_size, flash))
        except ValueError:  # that smallest value makes no valid model (e.g. RoPE's even head size)
            continue
        if best_value is None or value < best_value:
            best, best_value = name, value
    return best


def _flag_value(cfg, name: str) -> str:
    value = getattr(cfg, name)
    return f"--{name} {value}" if not (name == "mlp_hidden" and value == 0) else f"--n_embd {cfg.n_embd}"


def format_bytes(n: int) -> str:
    """Decimal units, two significant digits: 3.1 TB, 22 GB, 640 MB; beyond PB in powers of ten."""
    for unit, size in (("PB", 10 ** 15), ("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if n >= size:
            value = n / size
            if unit == "PB" and value >= 1000:
                return f"{n:.1e} bytes"
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} bytes"


def check_checkpoint_config(config: GPTConfig | None, vocab_size: int, n_tensors: int, where,
                            available: int | None = None) -> str | None:
    """A problem (one line, no fix) with the config a checkpoint states, found in O(1) before any
    table of its shapes is built or any array read: its weights alone do not fit the machine's
    memory, or it describes far more tensors than the file holds. None if it is plausible."""
    if config is None:  # bigram: one (V, V) table
        weights, tensors = vocab_size * vocab_size * FLOAT_BYTES, 1
        shape = f"vocab_size={vocab_size}"
    else:
        weights, tensors = parameter_count(config) * FLOAT_BYTES, parameter_tensor_count(config)
        shape = ", ".join(f"{k}={getattr(config, k)}" for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                                                 "n_embd", "mlp_hidden"))
    if available is None:
        available = available_memory()
    if available is not None and weights > available:
        return (f"{where}: its config ({shape}) needs ~{format_bytes(weights)} for the weights alone; "
                f"{format_bytes(available)} are available")
    # the checks after this one name each missing tensor from a table of the expected ones: a table
    # about the size of the file's own listing, never one the config alone makes huge
    if tensors > 2 * n_tensors + 16:
        return (f"{where}: its config ({shape}) describes {tensors:,} parameter tensors but the file holds "
                f"{n_tensors:,}")
    return None
