"""One training loop for both backends, and the `sample` command.

The loop owns the bookkeeping: the settings of the run (fresh, --resume or --init_from), the text,
which step evaluates, saves, logs or stops, and the final sample. The backend (gptapp.backends.numpy
or gptapp.backends.torch) owns the model, the optimiser and the random streams; `Backend` (gptapp.backend)
is everything the loop asks of it; the checkpoint's contents are put together here (save_checkpoint). Both backends print the same log lines (gptapp.run_log).
"""
from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from npgpt.config import GPTConfig
from npgpt.data import CharTokenizer, check_text_length
from npgpt.optim import cosine_lr

from .autocomplete import autocomplete, check_prompt, read_prompt
from .backend import (  # noqa: F401 (eval_seed: the loop's rule too)
    Backend, Built, eval_seed, local_accumulation_steps, model_vocab_size)
from .budget import check_training_budget
from .checkpoint import TORCH_EXT, Checkpoint, CheckpointError, WriteError, checkpoint_paths, guarded_write, link_or_copy
from .cli import init_from_train_config, resumed_train_config, train_config_from_args
from .data import Tokenizer, checkpoint_tokenizer, load_text, training_splits
from .errors import INSTALL_TORCH, TrainingError, UsageError, torch_installed
from .run_dir import (
    check_out_dir_flags,
    lock_out_dir,
    make_room,
    only_a_log,
    refuse_used_out_dir,
    refuse_what_is_no_file,
)
from .run_log import METRICS_NAME, PLOT_NAME, RunLog, StopRequest, stop_at_once
from .settings import MAX_SEED, TrainConfig


# --------------------------------------------------------------------------- rules both backends share

def learning_rate_at(cfg: TrainConfig, it: int) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)


def save_checkpoint(backend: Backend, cfg: TrainConfig, tokenizer: Tokenizer, path: Path, it: int,
                    best_val: float) -> None:
    """Write the run's checkpoint at step `it`: the settings, the tokenizer (characters, or GPT-2's BPE)
    and the step from here, the weights, optimiser and RNG states from the backend. Every rank calls
    this; rank 0 writes."""
    state = backend.state()
    if state is None:
        return
    gpt = cfg.model == "gpt"
    chars = isinstance(tokenizer, CharTokenizer)
    vocab_size = state.params["transformer.wte.weight"].shape[0] if gpt else None  # the model's: BPE may pad it
    ckpt = Checkpoint(backend=backend.info.name, model=cfg.model,
                      gpt_config=cfg.gpt_config(vocab_size) if gpt else None,
                      vocab=tokenizer.vocab_string() if chars else None, params=state.params,
                      train_config=cfg.to_dict(), iter_num=it, best_val_loss=best_val, optimizer=state.optimizer,
                      rng=state.rng, tokenizer=None if chars else tokenizer)
    guarded_write(path, lambda: backend.info.write(path, ckpt))


def non_finite_message(it: int, last_saved, what: str = "loss", value: float | None = None) -> str:
    shown = "nan or inf" if value is None else value
    if not last_saved:  # nothing of this run to resume: --resume would find none, or an older run's
        return (f"the {what} is not finite ({shown}) at step {it}; stopped, and no checkpoint was written; lower "
                "--learning_rate and start again with --overwrite")
    return (f"the {what} is not finite ({shown}) at step {it}; stopped without saving, {last_saved[0]} (step "
            f"{last_saved[1]}) is the last good checkpoint; lower --learning_rate, then --resume")


# nanoGPT reports MFU from the 5th step of a process on: the first steps hold warm-up (allocator,
# cuDNN/cuBLAS heuristics, any compilation left), and would show a figure near 0.
MFU_FROM_STEP = 5


def write_failed_message(err: WriteError, last_saved) -> str:
    """One line for a failed write during a run: the file, the cause, and advice that is true of what
    is on disk (the newest checkpoint of the run, if any)."""
    fix = "free disk space or fix permissions"
    kind = "checkpoint" if err.path.name.startswith("ckpt_") else "file"
    if err.path.name == PLOT_NAME and last_saved:
        return (f"cannot write the plot {err.path} ({err.cause}); the run is saved ({last_saved[0]}, step "
                f"{last_saved[1]}) and its metrics are in {err.path.with_name(METRICS_NAME)}; {fix}")
    if last_saved:
        return (f"cannot write {kind} {err.path} ({err.cause}); stopped, the last checkpoint {last_saved[0]} (step "
                f"{last_saved[1]}) is unchanged; {fix}, then --resume")
    return (f"cannot write {kind} {err.path} ({err.cause}); stopped, and no checkpoint of this run was written; "
            f"{fix}, then start again with --overwrite (or --move_aside to keep {METRICS_NAME})")


# --------------------------------------------------------------------------- settings of the run

def resume_checkpoint(paths: dict, backend: Backend) -> Checkpoint:
    last = paths["last"]
    if not last.exists():
        other = last.with_suffix(backend.info.other_ext)
        log = only_a_log(last.parent)
        if other.exists():
            needs = f" (both need torch: {INSTALL_TORCH})" if other.suffix == TORCH_EXT and not torch_installed() else ""
            hint = (f"; {other} is {backend.info.other_prog}'s: resume it with {backend.info.other_prog}, or start "
                    f"from its weights with --init_from {other}{needs}")
        elif log:
            hint = (f"; the run there saved none (it left only {', '.join(p.name for p in log)}): start a new run "
                    "there with --overwrite or --move_aside instead of --resume")
        else:
            hint = "; train without --resume first"
        raise CheckpointError(f"--resume: no checkpoint {last} in --out_dir{hint}")
    ckpt = backend.read_checkpoint(last, any_kind=False)  # its own kind: the optimiser and RNG state are its own
    if ckpt.backend != backend.info.name or ckpt.train_config is None:
        raise CheckpointError(f"--resume: {last} was not written by {backend.info.prog}; use --init_from to start "
                              "from its weights")
    return ckpt


def run_settings(args, backend: Backend, paths: dict) -> tuple[TrainConfig, Checkpoint | None]:
    """(settings, checkpoint or None): a fresh run, --resume's or --init_from's."""
    if args.resume:
        ckpt = resume_checkpoint(paths, backend)
        cfg = resumed_train_config(ckpt.train_config, args, ckpt.path)
        if ckpt.iter_num >= cfg.max_iters:
            raise UsageError(f"the run in {args.out_dir} has done {ckpt.iter_num} steps already, --max_iters is "
                             f"{cfg.max_iters}; pass a larger --max_iters to continue it")
        return cfg, ckpt
    if args.init_from:
        ckpt = backend.read_checkpoint(args.init_from, any_kind=True)
        if ckpt.backend == "hf":
            ckpt = fit_pretrained(ckpt, args.block_size)
        return init_from_train_config(args, ckpt.model, ckpt.gpt_config, backend.default_preset), ckpt
    return train_config_from_args(args, backend.default_preset), None


def fit_pretrained(ckpt: Checkpoint, block_size: int | None) -> Checkpoint:
    """A Hugging Face GPT-2 to fine-tune: with a smaller --block_size, its position table cropped to the
    first block_size rows (nanoGPT's crop_block_size: GPT-2's 1024 positions are costly on a CPU).
    UsageError for a larger --block_size, or a layer_norm_epsilon the run's settings cannot carry."""
    config = ckpt.gpt_config
    default_eps = GPTConfig.__dataclass_fields__["norm_eps"].default
    if config.norm_eps != default_eps:
        raise UsageError(f"{ckpt.path}: layer_norm_epsilon={config.norm_eps!r}, but a run's settings keep the "
                         f"norms' eps at {default_eps!r}; fine-tune a model with the standard epsilon (sample and "
                         "export take this one)")
    if block_size is None or block_size == config.block_size:
        return ckpt
    if block_size > config.block_size:
        raise UsageError(f"--block_size {block_size} is longer than the {config.block_size} positions of "
                         f"{ckpt.path} (n_positions); pass at most --block_size {config.block_size}")
    params = dict(ckpt.params)
    params["transformer.wpe.weight"] = params["transformer.wpe.weight"][:block_size].copy()  # (block_size, C)
    return replace(ckpt, gpt_config=replace(config, block_size=block_size), params=params)


# --------------------------------------------------------------------------- train

def run_training(args, make_backend: Callable[[], Backend]) -> int:
    """The `train` command of either script. Every check a user can fail comes before any work; the
    backend is made after the checks of the flags (the torch one picks its device then)."""
    if args.resume and args.init_from:
        raise UsageError("--resume and --init_from exclude each other: --resume continues the run in "
                         "--out_dir, --init_from starts a new one from a checkpoint's weights; pick one")
    check_out_dir_flags(args)
    if args.vocab and not args.init_from:
        raise UsageError("--vocab applies only with --init_from a nanoGPT ckpt.pt (its file has no vocabulary); "
                         "drop --vocab")
    backend = make_backend()
    # one writer per run directory: rank 0 holds the lock from before it reads anything there to the end
    lock = lock_out_dir(args.out_dir) if backend.is_main else None
    try:
        return locked_training(args, backend)
    finally:
        if lock is not None:
            lock.release()


def locked_training(args, backend: Backend) -> int:
    refuse_used_out_dir(args)
    paths = checkpoint_paths(args.out_dir, backend.info.ext)
    # a name the run writes that is taken by a directory would fail only after the work
    refuse_what_is_no_file(args.out_dir, [p.name for p in paths.values()] + [METRICS_NAME, PLOT_NAME])
    cfg, ckpt = run_settings(args, backend, paths)
    if args.vocab and (ckpt.vocab is not None or ckpt.tokenizer is not None or ckpt.backend == "hf"):
        what = "vocabulary" if ckpt.vocab is not None else "tokenizer (GPT-2's)"
        raise UsageError(f"--vocab: {ckpt.path} carries its own {what}; drop --vocab")
    local_accumulation_steps(cfg.gradient_accumulation_steps, backend.world_size)  # UsageError before any work
    out_dir = Path(args.out_dir)

    text = load_text(args.data)
    check_text_length(text, cfg.block_size)
    tokenizer = (checkpoint_tokenizer(ckpt, args.vocab, lambda: text) if ckpt is not None
                 else CharTokenizer.from_text(text))
    train_data, val_data = training_splits(text, tokenizer, cfg.block_size)
    # the sample at the end must not fail after the run
    check_final_prompt(tokenizer, cfg.prompt, args, text, cfg.block_size if cfg.model == "gpt" else None)
    check_training_budget(cfg, model_vocab_size(tokenizer, ckpt), backend.info.name, str(backend.device),
                          backend.attention)  # BudgetError before anything is built
    with backend.session():
        built = backend.build(cfg, tokenizer, train_data, val_data, ckpt, resume=args.resume)
        note = make_room(args) if backend.is_main else None  # every input is good: only then the earlier run goes
        if note:
            print(note)
        return train_loop(args, cfg, ckpt, backend, built, tokenizer, out_dir, paths, len(train_data),
                          len(val_data))


def check_final_prompt(tokenizer: Tokenizer, prompt: str, args, text: str, block_size: int | None) -> None:
    """UsageError unless the sample after training can encode its prompt (see check_prompt). When the prompt
    is the default newline (no --prompt given) and the text has none, the error is about the text."""
    if (getattr(args, "prompt", None) is None and prompt == "\n" and isinstance(tokenizer, CharTokenizer)
            and "\n" not in tokenizer.chars):
        where = f" {args.data}" if args.data else ""
        raise UsageError(f"the training text{where} has no newline, and the sample printed after training starts "
                         "from one (the default --prompt '\\n'); give the text line breaks, or pass a --prompt made "
                         f"of its characters, e.g. --prompt {shlex.quote(text[:1])}")
    check_prompt(tokenizer, prompt, block_size)


def train_loop(args, cfg: TrainConfig, ckpt: Checkpoint | None, backend: Backend, built: Built,
               tokenizer: Tokenizer, out_dir: Path, paths: dict, n_train: int, n_val: int) -> int:
    state = {"last_saved": None}  # (path, step) of the newest checkpoint: the advice after a failure names it
    try:
        return run_steps(args, cfg, ckpt, backend, built, tokenizer, out_dir, paths, n_train, n_val, state)
    except WriteError as err:  # metrics.jsonl, loss.png or a checkpoint
        raise TrainingError(write_failed_message(err, state["last_saved"])) from None


def run_steps(args, cfg: TrainConfig, ckpt: Checkpoint | None, backend: Backend, built: Built,
              tokenizer: Tokenizer, out_dir: Path, paths: dict, n_train: int, n_val: int, state: dict) -> int:
    start, best_val, last_saved = 0, math.inf, None  # last_saved: (path, step) of the newest checkpoint
    if args.resume:
        start, best_val, last_saved = ckpt.iter_num, ckpt.best_val_loss, (ckpt.path, ckpt.iter_num)
        state["last_saved"] = last_saved
    if backend.is_main:
        print(f"{backend.info.label}: {built.num_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
              f"{n_train:,} train / {n_val:,} val tokens")
        for line in built.banner:
            print(line)
        print("settings: " + " ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()))
        if args.resume:
            print(f"resuming from {ckpt.path} at step {start}")
        elif ckpt is not None:
            print(f"initialised from {ckpt.path} ({ckpt.backend})")

    log = RunLog(out_dir, cfg.max_iters, start, enabled=backend.is_main, progress=args.progress,
                 resume_from=start if args.resume else None)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps  # all processes
    compile_s = built.compile_s
    if compile_s is not None:
        log.info(f"compile: {compile_s:.1f}s before step {start} (training and evaluation graphs; not in the "
                 "step times, nor in the done line's seconds)")
        log.record(kind="compile", iter=start, seconds=compile_s)
    t_run = t_last = time.perf_counter()
    steps_since_log, just_logged = 0, False
    plot = True
    try:
        # under torchrun a Ctrl-C reaches each rank twice (the terminal's, then torchrun's): one request
        with StopRequest(forwarded=backend.world_size > 1) as stop:
            for it in range(start, cfg.max_iters + 1):
                is_eval = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (args.resume and it == start)
                # the same answer on every rank; where reading the loss is a sync, only when it is due anyway
                stop_now, first_bad = backend.poll(stop.requested, is_eval or just_logged or it == cfg.max_iters)
                if first_bad >= 0:
                    raise TrainingError(non_finite_message(first_bad, last_saved))
                just_logged = False
                if is_eval:
                    # a stop signal ends the evaluation between two batches (then the step is saved unevaluated)
                    losses = backend.evaluate(it, stop=lambda: stop.requested)
                    if losses is None:
                        stop_now = True
                    else:
                        log.log_eval(it, losses["train"], losses["val"])
                        if not math.isfinite(losses["val"]):
                            raise TrainingError(non_finite_message(it, last_saved, "val loss", losses["val"]))
                        if it > 0:
                            improved = losses["val"] < best_val
                            best_val = min(best_val, losses["val"])
                            save_checkpoint(backend, cfg, tokenizer, paths["last"], it, best_val)  # once per evaluation
                            last_saved = state["last_saved"] = (paths["last"], it)
                            if improved and backend.is_main:  # the same bytes: a hard link, not a second write
                                guarded_write(paths["best"], lambda: link_or_copy(paths["last"], paths["best"]))
                        t_last, steps_since_log = time.perf_counter(), 0  # evaluation time is not step time
                if it == cfg.max_iters and not stop_now:
                    break
                if stop_now:  # after the evaluation, so a resumed run need not repeat it
                    if last_saved != (paths["last"], it):
                        save_checkpoint(backend, cfg, tokenizer, paths["last"], it, best_val)
                        last_saved = state["last_saved"] = (paths["last"], it)
                    if backend.is_main:
                        log.info(f"saved {paths['last']} at step {it}")
                        print(f"error: interrupted ({stop.name if stop.requested else 'by another rank'}) "
                              f"at step {it}; saved {paths['last']}, continue with --resume", file=sys.stderr)
                    return stop.exit_code
                lr = learning_rate_at(cfg, it)
                loss_value = backend.step(it, lr, log=it % cfg.log_interval == 0)
                steps_since_log += 1
                log.step()
                if it % cfg.log_interval == 0:
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since_log
                    mfu = built.peak_step_s / dt if built.peak_step_s and it - start >= MFU_FROM_STEP else None
                    log.log_iter(it, loss_value, lr, dt * 1000, tokens_per_iter / dt, mfu)
                    t_last, steps_since_log, just_logged = now, 0, True
    except BaseException:  # nothing more is written after a failure (a second signal, a failed write)
        plot = False
        raise
    finally:
        log.close(plot=plot)

    if backend.is_main:
        saved = (f"best val loss {best_val:.4f}; checkpoints in {out_dir}" if last_saved else
                 "nothing was saved: checkpoints are written at evaluations after step 0")
        print(f"done: {cfg.max_iters - start} steps in {time.perf_counter() - t_run:.1f}s, {saved}")
        with stop_at_once():  # nothing left to save: a stop signal ends the sample at once
            print(autocomplete(backend.generator(), tokenizer, cfg.prompt, cfg.block_size if cfg.model == "gpt" else None,
                               cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed, cfg.top_p))
    return 0


# --------------------------------------------------------------------------- sample

def run_sample(args, read_checkpoint: Callable, build_generate: Callable) -> int:
    """The `sample` command: `read_checkpoint(path)` -> Checkpoint, `build_generate(ckpt)` ->
    (generate, block_size) for the backend's model holding the checkpoint's weights."""
    prompt = read_prompt(args.prompt, args.prompt_file)
    ckpt = read_checkpoint(args.ckpt if args.ckpt is not None else args.init_from)
    tokenizer = checkpoint_tokenizer(ckpt, args.vocab, lambda: load_text(args.data))
    check_prompt(tokenizer, prompt, ckpt.gpt_config.block_size if ckpt.model == "gpt" else None)
    generate, block_size = build_generate(ckpt)
    with stop_at_once():  # SIGINT or SIGTERM: one line, between two generated tokens
        for i in range(args.num_samples):  # the i-th with seed + i: the first is the one of a single sample
            if i:
                sys.stdout.write("---------------\n")
            text = autocomplete(generate, tokenizer, prompt, block_size, args.max_new_tokens, args.temperature,
                                args.top_k, (args.seed + i) % (MAX_SEED + 1), args.top_p)
            sys.stdout.write(text + "\n")
    return 0
