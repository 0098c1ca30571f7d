"""Training settings and named presets: one TrainConfig for both backends, with nanoGPT's names.

A preset fills every setting; flags given on the command line override it (gptapp.cli). No
exec-based configuration: presets are plain dataclass instances.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace

from npgpt.config import ConfigError, GPTConfig

OPTIMIZERS = ("adamw", "muon")
# The dtype of Muon's Newton-Schulz iteration in train_torch.py (torchgpt.muon.NS_DTYPES).
MUON_NS_DTYPES = ("auto", "bfloat16", "float32")
# Settings that only train_torch.py has a flag for: train_np.py's parser leaves them out, so giving
# one there is argparse's one-line error, as --dtype or --compile are (NumPy's Muon iterates in the
# parameters' own float32 or float64).
TORCH_ONLY_FIELDS = ("muon_ns_dtype",)
# Seeds both backends take everywhere they use one (torch generators, NumPy's default_rng).
MAX_SEED = 2 ** 32 - 1
# The smallest sampling temperature above 0: the sampler divides float32 logits by it in float64, and
# any float32 logit divided by this stays finite (float32's max / float64's max, about 1.9e-270).
MIN_TEMPERATURE = 3.4028234663852886e38 / 1.7976931348623157e308


class SettingError(ValueError):
    """A setting with a bad value: `name` (the TrainConfig field) and `why`; the message names its flag."""

    def __init__(self, name: str, value, why: str):
        super().__init__(f"--{name}={value!r} is invalid: {why}")
        self.name, self.why = name, why


# --------------------------------------------------------------------------- the model's settings

# GPTConfig's fields that are settings (those with a help text): declared and validated in
# npgpt.config only. A field that GPTConfig allows to be None (mlp_hidden) is an int here, 0 for None.
GPT_FIELDS = tuple(f for f in fields(GPTConfig) if "help" in f.metadata)
# The shape of nanoGPT's CPU recipe, where GPTConfig has no default or another one.
_RECIPE = {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "bias": False}


def _app_type(f) -> str:
    return f.type.replace(" | None", "")


def _app_default(f):
    if f.name in _RECIPE:
        return _RECIPE[f.name]
    return 0 if f.default is None else f.default


# The settings that fix what the model is: "gpt" or "bigram", then GPTConfig's settings.
ModelSettings = make_dataclass(
    "ModelSettings",
    [("model", "str", field(default="gpt", metadata={"help": "gpt, or bigram (the lecture's baseline: a token "
                                                             "embedding table only)"}))]
    + [(f.name, _app_type(f), field(default=_app_default(f), metadata=f.metadata)) for f in GPT_FIELDS],
    frozen=True, namespace={"__module__": __name__})

# The settings that fix the model (its parameters, and what they compute): a resumed run or
# --init_from keeps them. A resumed run keeps its optimizer too (--init_from starts a fresh one).
SHAPE_FIELDS = tuple(f.name for f in fields(ModelSettings) if f.name != "dropout") + ("optimizer",)
# Those of them that only the GPT has: a bigram model is its embedding table alone (block_size is the
# context of its batches).
GPT_ONLY_FIELDS = tuple(f.name for f in GPT_FIELDS if f.name != "block_size")


def model_settings(config: GPTConfig) -> dict:
    """The settings of a GPT with `config` (its shape, as --init_from takes it from a checkpoint)."""
    shape = {f.name: getattr(config, f.name) for f in GPT_FIELDS if f.name != "dropout"}
    return {"model": "gpt", **{k: 0 if v is None else v for k, v in shape.items()}}


@dataclass(frozen=True)
class TrainConfig(ModelSettings):
    # optimisation
    batch_size: int = 12  # per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches of a step, over all processes (nanoGPT's rule)
    max_iters: int = 2000
    learning_rate: float = 1e-3
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    # "muon": Muon for the 2-D matrices inside the blocks at muon_lr (following the same schedule,
    # scaled), AdamW at learning_rate for the embeddings, the head and every 1-D gain and bias
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_ns_dtype: str = "auto"  # train_torch.py: Newton-Schulz in bfloat16 (torch's) or float32
    # evaluation, logging, sampling
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1 = no top-p (nucleus) filtering
    prompt: str = "\n"

    def validate(self) -> None:
        """Raise ValueError naming the flag and its bad value."""
        def bad(name, why):
            raise SettingError(name, getattr(self, name), why)

        if self.model not in ("gpt", "bigram"):
            bad("model", "use gpt or bigram")
        try:
            self.gpt_config(vocab_size=1)
        except ConfigError as err:
            raise SettingError(err.name, getattr(self, err.name), err.why) from None
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "max_new_tokens", "top_k"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name, allowed in (("optimizer", OPTIMIZERS), ("muon_ns_dtype", MUON_NS_DTYPES)):
            if getattr(self, name) not in allowed:
                bad(name, f"use one of {', '.join(allowed)}")
        if self.optimizer == "muon" and self.model != "gpt":
            bad("optimizer", "muon trains the matrices inside the blocks; the bigram model has none, use adamw")
        if self.optimizer == "muon" and not self.learning_rate > 0.0:
            bad("learning_rate", "must be > 0 with --optimizer muon: Muon's rate follows the schedule, "
                                 "scaled by --muon_lr / --learning_rate")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "temperature", "muon_lr"):
            value = getattr(self, name)
            if not value >= 0.0 or value != value or value == float("inf"):
                bad(name, "must be a finite number >= 0")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            bad("temperature", f"use 0 (greedy) or a number >= {MIN_TEMPERATURE:.3g}: the logits divided by a "
                               "smaller one overflow")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            bad("top_p", "must lie in (0, 1] (1: no top-p filtering)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must lie in [0, 1)")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be an integer in [0, {MAX_SEED}]")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPT of these settings (ConfigError, a ValueError, if one is invalid)."""
        values = {f.name: getattr(self, f.name) for f in GPT_FIELDS}
        nullable = {f.name for f in GPT_FIELDS if "None" in f.type}
        return GPTConfig(vocab_size=vocab_size,
                         **{k: None if k in nullable and v == 0 else v for k, v in values.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a checkpoint's dict; unknown keys or values of the wrong type are an error (ValueError),
        missing ones take defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"the training settings are a {type(d).__name__}, not a mapping")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        for name, value in d.items():
            kind = {"bool": bool, "int": int, "float": (int, float), "str": str}[known[name]]
            if not isinstance(value, kind) or (isinstance(value, bool) and known[name] != "bool"):
                raise ValueError(f"the setting {name} is {value!r}, not of type {known[name]}")
        return cls(**d)


# What each setting does: the --help text of its flag (gptapp.cli adds every preset's value).
FIELD_HELP = {
    **{f.name: f.metadata["help"] for f in fields(ModelSettings)},
    "gradient_accumulation_steps": "micro-batches of one step, over all processes under torchrun",
    "optimizer": "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)",
    "muon_lr": "Muon's peak learning rate (with --optimizer muon; follows the same schedule)",
    "muon_ns_dtype": ("the dtype of Muon's Newton-Schulz iteration: bfloat16 (torch.optim.Muon's), float32, or "
                      "auto: bfloat16 but on a CPU without bfloat16 matmul kernels, float32 there"),
    "batch_size": "sequences per micro-batch and process",
    "max_iters": "optimisation steps of the run (with --resume: the step to reach)",
    "learning_rate": "peak learning rate",
    "decay_lr": "warm up, then decay the learning rate along a cosine",
    "warmup_iters": "steps of linear warmup",
    "lr_decay_iters": "the step where the cosine reaches --min_lr (a fresh run's --max_iters sets it too)",
    "min_lr": "the learning rate after lr_decay_iters",
    "beta1": "AdamW's beta1",
    "beta2": "AdamW's beta2",
    "weight_decay": "AdamW's decoupled weight decay (matrices only)",
    "grad_clip": "clip the gradient's global norm to this (0: off)",
    "eval_interval": "evaluate and save checkpoints every this many steps",
    "eval_iters": "batches per split in each evaluation",
    "log_interval": "print a step's loss every this many steps",
    "seed": f"seed of the initial weights, the batches, dropout and the final sample, in [0, {MAX_SEED}]",
    "max_new_tokens": "characters of the sample printed after training",
    "temperature": "the sample's temperature (0: greedy)",
    "top_k": "sample from the k most likely characters only (0: all)",
    "top_p": "then from the smallest set of most likely characters whose probability reaches this (1: all)",
    "prompt": "the text the sample after training continues",
}

# nanoGPT's CPU recipe (README, "I only have a macbook"), exactly: tied head, no biases, GELU.
NANOGPT_CPU = TrainConfig()
# The default without a GPU: nanoGPT's CPU recipe with an untied output head (lm_head.weight, +8k
# parameters, as the lecture's gpt.py). Tied, this recipe ends at val 1.905-1.926 on this data
# (five runs, both backends); untied it reaches 1.876 in the same 2000 steps (bench/RESULTS.md).
CPU = replace(NANOGPT_CPU, tie_weights=False)

# What each preset is, for --help (the cost of a run is on this project's 2-core CPU; bench/RESULTS.md).
PRESET_HELP = {
    "cpu": "nanoGPT's CPU recipe with an untied head, 0.8M parameters, 2000 steps (~2.5 min, val ~1.88)",
    "nanogpt-cpu": "nanoGPT's CPU recipe exactly (tied head)",
    "shakespeare-char": "nanoGPT's baby GPT, 10.7M parameters, 5000 steps: the default on a GPU (minutes there)",
    "lecture": ("the lecture's gpt.py, 10.8M parameters, 5000 steps: meant for a GPU; on a 2-core CPU a step "
                "takes 20-30 s in either script, so the run takes over a day (shorten it with --max_iters)"),
    "bigram": "the lecture's bigram baseline, 3000 steps (seconds)",
    "modern-cpu": "the cpu recipe with the modern block (RMSNorm, RoPE, QK-norm, SwiGLU) and Muon",
    "modern-gpu": "shakespeare-char's size with the modern block and Muon: for a GPU",
    "tiny": "2 layers of 32 channels, 40 steps: seconds, for tests and smoke runs",
}

PRESETS: dict[str, TrainConfig] = {
    "cpu": CPU,
    "nanogpt-cpu": NANOGPT_CPU,
    # nanoGPT's config/train_shakespeare_char.py, the "baby GPT": the default with a GPU.
    "shakespeare-char": replace(
        NANOGPT_CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
        max_iters=5000, lr_decay_iters=5000, eval_iters=200),
    # The lecture's gpt.py: ReLU MLP, untied head, biases, constant lr 3e-4, torch's default AdamW.
    "lecture": replace(
        CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=True,
        activation="relu", tie_weights=False, batch_size=64, max_iters=5000, learning_rate=3e-4,
        decay_lr=False, warmup_iters=0, beta2=0.999, weight_decay=0.01, grad_clip=0.0,
        eval_interval=500, eval_iters=200),
    # The lecture's bigram.py baseline.
    "bigram": replace(
        CPU, model="bigram", block_size=8, batch_size=32, max_iters=3000, learning_rate=1e-2,
        decay_lr=False, warmup_iters=0, beta2=0.999, weight_decay=0.0, grad_clip=0.0,
        eval_interval=300, eval_iters=200),
    # The modern block at the cpu preset's size, batch and steps: RMSNorm, RoPE, QK-norm,
    # SwiGLU with H = 344 ~ 8C/3 (the MLP's parameters and FLOPs of 4C's GELU MLP), Muon for the
    # block matrices. muon_lr from a sweep of 0.04 / 0.02 / 0.01 / 0.005 (val 1.632 / 1.602 / 1.585 /
    # 1.580 at step 2000, torch; bench/RESULTS.md); AdamW's learning rate stays the cpu preset's.
    "modern-cpu": replace(
        CPU, norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", mlp_hidden=344,
        optimizer="muon", muon_lr=0.005),
    # The same switches at shakespeare-char's size (H = 1024 = 8C/3).
    "modern-gpu": replace(
        NANOGPT_CPU, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
        max_iters=5000, lr_decay_iters=5000, eval_iters=200, tie_weights=False, norm="rmsnorm",
        pos_emb="rope", qk_norm=True, activation="swiglu", mlp_hidden=1024, optimizer="muon",
        muon_lr=0.02),
    # Seconds, for tests and smoke runs.
    "tiny": replace(
        CPU, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_iters=40,
        lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=2, log_interval=10,
        max_new_tokens=60),
}
