"""Train the NumPy GPT (npgpt) on Tiny Shakespeare, save checkpoints, autocomplete prompts.

    python train_np.py                                   # nanoGPT's CPU recipe, untied head (preset "cpu"), then a sample
    python train_np.py --preset tiny --data input.txt    # seconds
    python train_np.py --resume                          # continue the run in --out_dir (ckpt_last.npz)
    python train_np.py --init_from out/ckpt_best.pt      # start from train_torch.py's or nanoGPT's weights
    python train_np.py sample --ckpt out/ckpt_best.npz --prompt "ROMEO:" --seed 1

Checkpoints (ckpt_best.npz, ckpt_last.npz), metrics.jsonl and loss.png go to --out_dir (default out/).
Reading a .pt checkpoint imports torch; nothing else here does.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from npgpt import GPT, BigramLanguageModel
from npgpt.fast import keep_freed_memory
from npgpt.checkpoint import (
    NUMPY_EXT,
    Checkpoint,
    CheckpointError,
    checkpoint_paths,
    ensure_writable_dir,
    load_checkpoint,
    save_npz,
)
from npgpt.data import CharTokenizer, check_text_length, get_batch, load_text
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.run_log import RunLog, StopRequest
from npgpt.train_config import (
    TrainConfig,
    TrainingError,
    UsageError,
    autocomplete,
    checkpoint_tokenizer,
    init_from_train_config,
    one_line,
    resumed_train_config,
    run_cli,
    sample_parser,
    train_config_from_args,
    train_parser,
    training_splits,
)

PROG = "train_np.py"
BACKEND = "numpy"
DEFAULT_PRESET = "cpu"


# --------------------------------------------------------------------------- model and schedule

def build_model(cfg: TrainConfig, vocab_size: int):
    if cfg.model == "bigram":
        return BigramLanguageModel(vocab_size, seed=cfg.seed)
    return GPT(cfg.gpt_config(vocab_size), seed=cfg.seed)


def model_from_checkpoint(ckpt: Checkpoint):
    model = (BigramLanguageModel(ckpt.vocab_size) if ckpt.model == "bigram" else GPT(ckpt.gpt_config))
    load_params_into(model, ckpt.params)
    return model.eval()


def load_params_into(model, params: dict) -> None:
    """Copy in place: the optimiser holds references to the model's arrays."""
    for name, p in model.params.items():
        p[...] = params[name]


def learning_rate_at(cfg: TrainConfig, it: int) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)


def eval_rng(cfg: TrainConfig, it: int) -> np.random.Generator:
    """Evaluation batches come from their own stream, so evaluating never shifts the training batches."""
    return np.random.default_rng([cfg.seed, 2, it])


def estimate_loss(model, splits: dict, cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """Mean loss over eval_iters random batches of each split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = [model.forward(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1]
                  for _ in range(cfg.eval_iters)]
        out[name] = float(np.mean(losses))
    model.train()
    return out


# --------------------------------------------------------------------------- checkpoints

def torch_loader(path):
    """Read a .pt (ours or nanoGPT's) through torchgpt; torch is imported only here."""
    try:
        from torchgpt.train_utils import load_torch_checkpoint
    except ImportError as err:
        raise CheckpointError(f"{path} is a PyTorch checkpoint and reading it needs torch ({err}); "
                              "install torch, or use a .npz checkpoint") from None
    return load_torch_checkpoint(path)


def load_any_checkpoint(path) -> Checkpoint:
    return load_checkpoint(path, torch_loader=torch_loader)


def resume_checkpoint(paths: dict) -> Checkpoint:
    last = paths["last"]
    if not last.exists():
        other = last.with_suffix(".pt")
        hint = (f"; {other} is train_torch.py's: resume it with train_torch.py, or start from its weights "
                f"with --init_from {other}") if other.exists() else "; train without --resume first"
        raise CheckpointError(f"--resume: no checkpoint {last} in --out_dir{hint}")
    ckpt = load_checkpoint(last)  # .npz only: the optimiser and RNG state must be NumPy's
    if ckpt.backend != BACKEND or ckpt.train_config is None:
        raise CheckpointError(f"--resume: {last} was not written by {PROG}; use --init_from to start from its weights")
    return ckpt


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    try:
        save_npz(path, ckpt)
    except OSError as err:
        raise TrainingError(f"cannot write checkpoint {path} ({err.strerror or err}); the previous one is "
                            "unchanged; free disk space or fix permissions, then --resume") from None


# --------------------------------------------------------------------------- train

def train_command(argv: list[str]) -> int:
    args = train_parser(PROG, __doc__, DEFAULT_PRESET).parse_args(argv)
    keep_freed_memory()  # each step reuses the last one's freed activations instead of page-faulting
    if args.resume and args.init_from:
        raise UsageError("--resume and --init_from exclude each other: --resume continues the run in "
                         "--out_dir, --init_from starts a new one from a checkpoint's weights; pick one")
    paths = checkpoint_paths(args.out_dir, NUMPY_EXT)
    ckpt = None
    if args.resume:
        ckpt = resume_checkpoint(paths)
        cfg = resumed_train_config(ckpt.train_config, args, ckpt.path)
        if ckpt.iter_num >= cfg.max_iters:
            raise UsageError(f"the run in {args.out_dir} has done {ckpt.iter_num} steps already, --max_iters is "
                             f"{cfg.max_iters}; pass a larger --max_iters to continue it")
    elif args.init_from:
        ckpt = load_any_checkpoint(args.init_from)
        cfg = init_from_train_config(args, ckpt.model, ckpt.gpt_config, DEFAULT_PRESET)
    else:
        cfg = train_config_from_args(args, DEFAULT_PRESET)
    out_dir = ensure_writable_dir(args.out_dir)  # before any work that a failed save would waste

    text = load_text(args.data)
    check_text_length(text, cfg.block_size)
    tokenizer = (checkpoint_tokenizer(ckpt, args.vocab, lambda: text) if ckpt is not None
                 else CharTokenizer.from_text(text))
    train_data, val_data = training_splits(text, tokenizer, cfg.block_size)

    model = build_model(cfg, tokenizer.vocab_size)
    if ckpt is not None:
        load_params_into(model, ckpt.params)
    optimizer = AdamW(model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                      weight_decay=cfg.weight_decay)
    data_rng = np.random.default_rng(cfg.seed)
    start, best_val = 0, math.inf
    last_saved = None  # (path, step) of the newest checkpoint on disk
    if args.resume:
        try:
            optimizer.load_state_dict(ckpt.optimizer)
            data_rng.bit_generator.state = ckpt.rng["data"]
            if cfg.model == "gpt":
                model.rng.bit_generator.state = ckpt.rng["dropout"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{ckpt.path}: its optimiser or RNG state is unusable ({one_line(err)}); "
                                  "start a new run, or --init_from it for its weights only") from None
        start, best_val, last_saved = ckpt.iter_num, ckpt.best_val_loss, (ckpt.path, ckpt.iter_num)

    print(f"npgpt: {model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
          f"{len(train_data):,} train / {len(val_data):,} val tokens")
    if args.resume:
        print(f"resuming from {ckpt.path} at step {start}")
    elif ckpt is not None:
        print(f"initialised from {ckpt.path} ({ckpt.backend})")

    def snapshot(it: int) -> Checkpoint:
        return Checkpoint(
            backend=BACKEND, model=cfg.model, gpt_config=cfg.gpt_config(tokenizer.vocab_size) if cfg.model == "gpt"
            else None, vocab=tokenizer.vocab_string(), params=model.params, train_config=cfg.to_dict(),
            iter_num=it, best_val_loss=best_val, optimizer=optimizer.state_dict(),
            rng={"data": data_rng.bit_generator.state,
                 "dropout": model.rng.bit_generator.state if cfg.model == "gpt" else None})

    log = RunLog(out_dir, cfg.max_iters, start, progress=args.progress,
                 resume_from=start if args.resume else None)
    splits = {"train": train_data, "val": val_data}
    tokens_per_iter = cfg.batch_size * cfg.block_size
    t_run = t_last = time.perf_counter()
    steps_since_log = 0
    plot = True
    try:
        with StopRequest() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # overflow warnings are not errors here: a loss that stops being finite is, checked below
            for it in range(start, cfg.max_iters + 1):
                if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (args.resume and it == start):
                    losses = estimate_loss(model, splits, cfg, eval_rng(cfg, it))
                    log.log_eval(it, losses["train"], losses["val"])
                    if not math.isfinite(losses["val"]):
                        raise TrainingError(non_finite_message(losses["val"], it, last_saved, "val loss"))
                    if it > 0:
                        if losses["val"] < best_val:
                            best_val = losses["val"]
                            save_checkpoint(paths["best"], snapshot(it))
                        save_checkpoint(paths["last"], snapshot(it))
                        last_saved = (paths["last"], it)
                    t_last, steps_since_log = time.perf_counter(), 0  # evaluation time is not step time
                if it == cfg.max_iters:
                    break
                if stop.requested:  # after the evaluation, so a resumed run need not repeat it
                    if last_saved != (paths["last"], it):
                        save_checkpoint(paths["last"], snapshot(it))
                    log.info(f"saved {paths['last']} at step {it}")
                    print(f"error: interrupted ({stop.name}) at step {it}; saved {paths['last']}, continue "
                          "with --resume", file=sys.stderr)
                    return stop.exit_code
                lr = learning_rate_at(cfg, it)
                x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, data_rng)
                _, loss = model.forward(x, y)
                if not math.isfinite(loss):
                    raise TrainingError(non_finite_message(loss, it, last_saved))
                grads = model.backward()
                if cfg.grad_clip > 0:
                    clip_grad_norm(grads, cfg.grad_clip)
                optimizer.step(grads, lr=lr)
                steps_since_log += 1
                log.step()
                if it % cfg.log_interval == 0:
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since_log
                    log.log_iter(it, loss, lr, dt * 1000, tokens_per_iter / dt)
                    t_last, steps_since_log = now, 0
    except TrainingError:
        plot = False
        raise
    finally:
        log.close(plot=plot)

    print(f"done: {cfg.max_iters - start} steps in {time.perf_counter() - t_run:.1f}s, "
          f"best val loss {best_val:.4f}; checkpoints in {out_dir}")
    print(autocomplete(model.generate, tokenizer, cfg.prompt, model_block_size(model), cfg.max_new_tokens,
                       cfg.temperature, cfg.top_k, cfg.seed))
    return 0


def non_finite_message(value: float, it: int, last_saved, what: str = "loss") -> str:
    kept = (f"{last_saved[0]} (step {last_saved[1]}) is the last good checkpoint"
            if last_saved else "no checkpoint was written")
    return (f"the {what} is not finite ({value}) at step {it}; stopped without saving, {kept}; lower "
            "--learning_rate, then --resume")


def model_block_size(model) -> int | None:
    return model.config.block_size if isinstance(model, GPT) else None


# --------------------------------------------------------------------------- sample

def sample_command(argv: list[str]) -> int:
    parser = sample_parser(PROG, "Autocomplete a prompt from a checkpoint (.npz, .pt or nanoGPT's ckpt.pt).")
    args = parser.parse_args(argv)
    ckpt = load_any_checkpoint(args.ckpt)
    tokenizer = checkpoint_tokenizer(ckpt, args.vocab, lambda: load_text(args.data))
    model = model_from_checkpoint(ckpt)
    text = autocomplete(model.generate, tokenizer, args.prompt, model_block_size(model), args.max_new_tokens,
                        args.temperature, args.top_k, args.seed)
    sys.stdout.write(text + "\n")
    return 0


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, train_command, sample_command)


if __name__ == "__main__":
    sys.exit(main())
