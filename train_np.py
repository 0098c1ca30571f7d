"""Train the NumPy GPT (npgpt) on Tiny Shakespeare, then print a sample.

    python train_np.py                          # nanoGPT's CPU recipe (preset "cpu")
    python train_np.py --preset tiny --data input.txt
    python train_np.py --preset bigram          # the lecture's baseline
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from npgpt import GPT, BigramLanguageModel
from npgpt.data import CharTokenizer, DataError, check_text_length, get_batch, load_text, train_val_split
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr
from npgpt.train_config import TrainConfig, add_train_flags, train_config_from_args


def build_model(cfg: TrainConfig, vocab_size: int):
    if cfg.model == "bigram":
        return BigramLanguageModel(vocab_size, seed=cfg.seed)
    return GPT(cfg.gpt_config(vocab_size), seed=cfg.seed)


def learning_rate_at(cfg: TrainConfig, it: int) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)


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


def train(cfg: TrainConfig, text: str) -> tuple:
    check_text_length(text, cfg.block_size)
    tokenizer = CharTokenizer.from_text(text)
    data = tokenizer.encode(text)
    train_data, val_data = train_val_split(data)
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < cfg.block_size + 1:
            raise DataError(f"the {name} split has {len(split)} tokens, fewer than block_size + 1 = "
                            f"{cfg.block_size + 1}; use a longer text or a smaller --block_size")
    model = build_model(cfg, tokenizer.vocab_size)
    optimizer = AdamW(model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                      weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    print(f"npgpt: {model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
          f"{len(train_data):,} train / {len(val_data):,} val tokens")

    splits = {"train": train_data, "val": val_data}
    t_last = time.perf_counter()
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            losses = estimate_loss(model, splits, cfg, rng)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if it == cfg.max_iters:
            break
        lr = learning_rate_at(cfg, it)
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, rng)
        _, loss = model.forward(x, y)
        grads = model.backward()
        if cfg.grad_clip > 0:
            clip_grad_norm(grads, cfg.grad_clip)
        optimizer.step(grads, lr=lr)
        if it % cfg.log_interval == 0:
            now = time.perf_counter()
            print(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, time {(now - t_last) * 1000:.1f}ms")
            t_last = now
    return model, tokenizer


def sample(model, tokenizer: CharTokenizer, cfg: TrainConfig) -> str:
    context = tokenizer.encode(cfg.prompt)[None, :]  # (1, T)
    if context.shape[1] == 0:
        context = np.zeros((1, 1), dtype=np.int64)
    out = model.generate(context, cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k or None, rng=np.random.default_rng(cfg.seed))
    return tokenizer.decode(out[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="path to the training text (default: NPGPT_DATA, "
                        "the cache, or a download of Tiny Shakespeare)")
    add_train_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg = train_config_from_args(args)
        text = load_text(args.data)
        model, tokenizer = train(cfg, text)
        print(sample(model, tokenizer, cfg))
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
