"""Train the PyTorch GPT (torchgpt) on Tiny Shakespeare, save checkpoints, autocomplete prompts.

    python train_torch.py                                  # preset shakespeare-char on a GPU, cpu otherwise
    python train_torch.py --preset tiny --device cpu       # seconds
    python train_torch.py --resume                         # continue the run in --out_dir (ckpt_last.pt)
    python train_torch.py --init_from out/ckpt_best.npz    # start from train_np.py's or nanoGPT's weights
    torchrun --standalone --nproc_per_node 8 train_torch.py          # DDP on 8 GPUs (gloo on CPUs)
    python train_torch.py sample --ckpt out/ckpt_best.pt --prompt "ROMEO:" --seed 1

Same flags, presets and log lines as train_np.py, plus --device, --dtype, --compile, --attention.
On a GPU: bf16 autocast, TF32, SDPA (flash) attention, fused AdamW, torch.compile, batches drawn
on the device; the host reads a number back only on log and eval steps.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from npgpt.checkpoint import (
    FORMAT,
    TORCH_EXT,
    VERSION,
    Checkpoint,
    CheckpointError,
    checkpoint_paths,
    ensure_writable_dir,
    load_checkpoint,
)
from npgpt.data import CharTokenizer, check_text_length, load_text
from npgpt.optim import cosine_lr
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
from torchgpt.convert import load_params
from torchgpt.model import GPT, BigramLanguageModel
from torchgpt.train_utils import (
    DeviceBatches,
    DistInfo,
    all_mean,
    autocast,
    dist_env,
    gather_rng_states,
    init_distributed,
    load_optimizer_state,
    load_torch_checkpoint,
    peak_flops,
    pick_device,
    pick_dtype,
    save_torch_checkpoint,
    set_rng_state,
    set_tf32,
    shutdown_distributed,
    sync_flags,
    wrap_ddp,
)

PROG = "train_torch.py"
BACKEND = "torch"


# --------------------------------------------------------------------------- model and schedule

def build_model(cfg: TrainConfig, vocab_size: int, attention: str = "sdpa") -> torch.nn.Module:
    if cfg.model == "bigram":
        return BigramLanguageModel(vocab_size)
    return GPT(cfg.gpt_config(vocab_size), attention=attention)


def model_from_checkpoint(ckpt: Checkpoint, device: torch.device) -> torch.nn.Module:
    model = BigramLanguageModel(ckpt.vocab_size) if ckpt.model == "bigram" else GPT(ckpt.gpt_config)
    load_params(model, ckpt.params)
    return model.to(device).eval()


def learning_rate_at(cfg: TrainConfig, it: int) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, splits: dict, cfg: TrainConfig, it: int, amp, info: DistInfo) -> dict:
    """Mean loss over eval_iters batches of each split (over all ranks), in eval mode.

    The batches come from a generator seeded by (seed, it), never from the training stream.
    """
    model.eval()
    out = {}
    for name, batches in splits.items():
        gen = batches.new_generator(cfg.seed * 1_000_003 + it)
        losses = torch.zeros(cfg.eval_iters, device=batches.device)
        for k in range(cfg.eval_iters):
            x, y = batches.get(gen)
            with amp:
                _, loss = model(x, y)
            losses[k] = loss.float()
        out[name] = all_mean(losses.mean(), info).item()
    model.train()
    return out


# --------------------------------------------------------------------------- checkpoints

def load_any_checkpoint(path) -> Checkpoint:
    return load_checkpoint(path, torch_loader=load_torch_checkpoint)


def resume_checkpoint(paths: dict) -> Checkpoint:
    last = paths["last"]
    if not last.exists():
        other = last.with_suffix(".npz")
        hint = (f"; {other} is train_np.py's: resume it with train_np.py, or start from its weights with "
                f"--init_from {other}") if other.exists() else "; train without --resume first"
        raise CheckpointError(f"--resume: no checkpoint {last} in --out_dir{hint}")
    ckpt = load_torch_checkpoint(last)
    if ckpt.backend != BACKEND or ckpt.train_config is None:
        raise CheckpointError(f"--resume: {last} was not written by {PROG}; use --init_from to start from its weights")
    return ckpt


def save_checkpoint(path, payload: dict) -> None:
    try:
        save_torch_checkpoint(path, payload)
    except OSError as err:
        raise TrainingError(f"cannot write checkpoint {path} ({err.strerror or err}); the previous one is "
                            "unchanged; free disk space or fix permissions, then --resume") from None


def non_finite_message(it: int, last_saved, what: str = "loss") -> str:
    kept = (f"{last_saved[0]} (step {last_saved[1]}) is the last good checkpoint"
            if last_saved else "no checkpoint was written")
    return (f"the {what} is not finite (nan or inf) at step {it}; stopped without saving, {kept}; lower "
            "--learning_rate, then --resume")


# --------------------------------------------------------------------------- train

def train_command(argv: list[str]) -> int:
    args = train_parser(PROG, __doc__, "cpu, or shakespeare-char with CUDA", torch_flags=True).parse_args(argv)
    if args.resume and args.init_from:
        raise UsageError("--resume and --init_from exclude each other: --resume continues the run in "
                         "--out_dir, --init_from starts a new one from a checkpoint's weights; pick one")
    info = dist_env()
    device = pick_device(args.device, info.local_rank)
    default_preset = "shakespeare-char" if device.type == "cuda" else "cpu"
    paths = checkpoint_paths(args.out_dir, TORCH_EXT)
    ckpt = None
    if args.resume:
        ckpt = resume_checkpoint(paths)
        cfg = resumed_train_config(ckpt.train_config, args, ckpt.path)
        if ckpt.iter_num >= cfg.max_iters:
            raise UsageError(f"the run in {args.out_dir} has done {ckpt.iter_num} steps already, --max_iters is "
                             f"{cfg.max_iters}; pass a larger --max_iters to continue it")
    elif args.init_from:
        ckpt = load_any_checkpoint(args.init_from)
        cfg = init_from_train_config(args, ckpt.model, ckpt.gpt_config, default_preset)
    else:
        cfg = train_config_from_args(args, default_preset)
    dtype = pick_dtype(args.dtype, device)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    out_dir = ensure_writable_dir(args.out_dir) if info.is_main else args.out_dir

    text = load_text(args.data)
    check_text_length(text, cfg.block_size)
    tokenizer = (checkpoint_tokenizer(ckpt, args.vocab, lambda: text) if ckpt is not None
                 else CharTokenizer.from_text(text))
    train_data, val_data = training_splits(text, tokenizer, cfg.block_size)

    info = init_distributed(info, device)
    try:
        status = train_loop(args, cfg, ckpt, tokenizer, train_data, val_data, device, dtype, use_compile,
                            info, out_dir, paths)
        if info.enabled:  # rank 0 may still be sampling: leave together, or gloo aborts the early rank
            torch.distributed.barrier()
        return status
    finally:
        shutdown_distributed(info)


def train_loop(args, cfg: TrainConfig, ckpt: Checkpoint | None, tokenizer: CharTokenizer, train_data, val_data,
               device: torch.device, dtype: torch.dtype, use_compile: bool, info: DistInfo, out_dir, paths) -> int:
    if device.type == "cuda":
        set_tf32(True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = build_model(cfg, tokenizer.vocab_size, args.attention)
    if ckpt is not None:
        try:
            load_params(raw, ckpt.params)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.path}: {one_line(err)}") from None
    raw.to(device)
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout: a different stream on every rank
    batches = {"train": DeviceBatches(train_data, cfg.batch_size, cfg.block_size, device, cfg.seed,
                                      info.rank, info.world_size),
               "val": DeviceBatches(val_data, cfg.batch_size, cfg.block_size, device, cfg.seed + 1,
                                    info.rank, info.world_size)}
    start, best_val, last_saved = 0, math.inf, None
    if args.resume:
        try:
            load_optimizer_state(optimizer, ckpt.optimizer)
            batches["train"].generator.set_state(ckpt.rng["data"])
            same_world = set_rng_state(ckpt.rng["per_rank"], device, info)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{ckpt.path}: its optimiser or RNG state is unusable ({one_line(err)}); "
                                  "start a new run, or --init_from it for its weights only") from None
        if not same_world and info.is_main:
            print(f"note: {ckpt.path} was saved by {len(ckpt.rng['per_rank'])} process(es), this run has "
                  f"{info.world_size}; dropout streams start afresh", file=sys.stderr)
        start, best_val, last_saved = ckpt.iter_num, ckpt.best_val_loss, (ckpt.path, ckpt.iter_num)

    model = torch.compile(raw) if use_compile else raw
    train_model = wrap_ddp(model, device, info)
    amp = autocast(device, dtype)
    peak = peak_flops(device) if isinstance(raw, GPT) else None

    if info.is_main:
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"torchgpt: {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
              f"{len(train_data):,} train / {len(val_data):,} val tokens")
        print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, compile {'on' if use_compile else 'off'}, "
              f"attention {args.attention if isinstance(raw, GPT) else '-'}, world size {info.world_size}")
        if args.resume:
            print(f"resuming from {ckpt.path} at step {start}")
        elif ckpt is not None:
            print(f"initialised from {ckpt.path} ({ckpt.backend})")

    def save(path, it: int) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        per_rank = gather_rng_states(device, info)
        if not info.is_main:
            return
        payload = {
            "format": FORMAT, "version": VERSION, "backend": BACKEND, "model": cfg.model,
            "gpt_config": cfg.gpt_config(tokenizer.vocab_size).to_dict() if cfg.model == "gpt" else None,
            "train_config": cfg.to_dict(), "vocab": tokenizer.vocab_string(),
            "model_state": {k: v.detach() for k, v in raw.state_dict().items()},
            "optimizer": optimizer.state_dict(), "iter_num": it, "best_val_loss": float(best_val),
            "rng": {"data": batches["train"].generator.get_state(), "per_rank": per_rank,
                    "world_size": info.world_size},
        }
        save_checkpoint(path, payload)

    log = RunLog(out_dir, cfg.max_iters, start, enabled=info.is_main, progress=args.progress,
                 resume_from=start if args.resume else None)
    tokens_per_iter = cfg.batch_size * cfg.block_size * info.world_size
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    check_every_step = device.type == "cpu"  # reading a flag costs nothing there; on a GPU it is a sync
    t_run = t_last = time.perf_counter()
    steps_since_log, just_logged = 0, False
    plot = True
    try:
        with StopRequest() as stop:
            for it in range(start, cfg.max_iters + 1):
                is_eval = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (args.resume and it == start)
                stop_now = False
                if check_every_step or is_eval or just_logged or it == cfg.max_iters:
                    stop_now, first_bad = sync_flags(stop.requested, bad_step, info)  # the same on every rank
                    if first_bad >= 0:
                        raise TrainingError(non_finite_message(first_bad, last_saved))
                just_logged = False
                if is_eval:
                    losses = estimate_loss(model, batches, cfg, it, amp, info)
                    log.log_eval(it, losses["train"], losses["val"])
                    if not math.isfinite(losses["val"]):
                        raise TrainingError(non_finite_message(it, last_saved, "val loss"))
                    if it > 0:
                        if losses["val"] < best_val:
                            best_val = losses["val"]
                            save(paths["best"], it)
                        save(paths["last"], it)
                        last_saved = (paths["last"], it)
                    t_last, steps_since_log = time.perf_counter(), 0  # evaluation time is not step time
                if it == cfg.max_iters:
                    break
                if stop_now:  # after the evaluation, so a resumed run need not repeat it
                    if last_saved != (paths["last"], it):
                        save(paths["last"], it)
                    if info.is_main:
                        log.info(f"saved {paths['last']} at step {it}")
                        print(f"error: interrupted ({stop.name if stop.requested else 'by another rank'}) "
                              f"at step {it}; saved {paths['last']}, continue with --resume", file=sys.stderr)
                    return stop.exit_code
                lr = learning_rate_at(cfg, it)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = batches["train"].get()
                with amp:
                    _, loss = train_model(x, y)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step,
                                       torch.full_like(bad_step, it))
                steps_since_log += 1
                log.step()
                if it % cfg.log_interval == 0:
                    lossf = loss.float().item()  # the one sync of a log step
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since_log
                    mfu = raw.estimate_mfu(cfg.batch_size, dt, peak) if peak else None
                    log.log_iter(it, lossf, lr, dt * 1000, tokens_per_iter / dt, mfu)
                    t_last, steps_since_log, just_logged = now, 0, True
    except TrainingError:
        plot = False
        raise
    finally:
        log.close(plot=plot)

    if info.is_main:
        print(f"done: {cfg.max_iters - start} steps in {time.perf_counter() - t_run:.1f}s, "
              f"best val loss {best_val:.4f}; checkpoints in {out_dir}")
        raw.eval()
        generate = lambda ids, n, **kw: raw.generate(ids, n, **kw).cpu().numpy()  # noqa: E731
        print(autocomplete(generate, tokenizer, cfg.prompt, model_block_size(raw), cfg.max_new_tokens,
                           cfg.temperature, cfg.top_k, cfg.seed))
    return 0


def model_block_size(model) -> int | None:
    return model.config.block_size if isinstance(model, GPT) else None


# --------------------------------------------------------------------------- sample

def sample_command(argv: list[str]) -> int:
    args = sample_parser(PROG, "Autocomplete a prompt from a checkpoint (.pt, .npz or nanoGPT's ckpt.pt).",
                         torch_flags=True).parse_args(argv)
    device = pick_device(args.device)
    ckpt = load_any_checkpoint(args.ckpt)
    tokenizer = checkpoint_tokenizer(ckpt, args.vocab, lambda: load_text(args.data))
    set_tf32(False)  # full float32 matmuls: the same logits, so the same text, as train_np.py
    model = model_from_checkpoint(ckpt, device)
    generate = lambda ids, n, **kw: model.generate(ids, n, **kw).cpu().numpy()  # noqa: E731
    text = autocomplete(generate, tokenizer, args.prompt, model_block_size(model), args.max_new_tokens,
                        args.temperature, args.top_k, args.seed)
    sys.stdout.write(text + "\n")
    return 0


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, train_command, sample_command)


if __name__ == "__main__":
    sys.exit(main())
