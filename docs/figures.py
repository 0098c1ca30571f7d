"""The README's three pictures, computed from the code they illustrate.

    python docs/figures.py [--out docs/figures] [--data PATH] [--ckpt PATH] [--quick]

    loss_curves.png     npgpt and torchgpt trained from the same init on the same batches:
                        the two loss curves lie on top of each other; a second panel shows
                        |loss_np - loss_torch| per step on a log scale (float64 and float32).
    attention_maps.png  the attention probabilities of every head of every layer of a small
                        trained npgpt GPT on a prompt, one (query x key) map per head.
    parity_errors.png   the normwise relative error of the forward outputs and of every parameter's
                        gradient, npgpt against torch autograd, float64 beside float32, with the
                        bounds the tests assert. Numbers from parity_tests.report.parity_table;
                        if that cannot be imported or fails, computed here (gradient_parity).

Everything is seeded, runs on the CPU and draws with matplotlib's Agg backend (no display); the
same inputs give byte-identical PNGs. --quick shrinks every model and run so the whole script takes
seconds, and always uses gradient_parity on a tiny model (the tests run it).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script: one BLAS/OpenMP thread unless the caller says otherwise. These models are tiny,
# and on a busy 2-core machine threads that spin-wait make every step many times slower. It must
# happen before numpy and torch are imported; imported as a module (tests), nothing is changed.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python docs/figures.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from npgpt import GPT, GPTConfig  # noqa: E402
from gptapp.data import load_text  # noqa: E402
from npgpt.data import CharTokenizer, DataError, get_batch, train_val_split  # noqa: E402
from npgpt.compare import rel_error  # noqa: E402
from npgpt.layers import (  # noqa: E402
    BlockOptions,
    attention_probs,
    block_forward,
    embedding_forward,
    layernorm_forward,
    linear_forward,
    split_heads,
)
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr  # noqa: E402

FIGURES = ("loss_curves.png", "attention_maps.png", "parity_errors.png")
BOUNDS = {"float64": 1e-12, "float32": 1e-4}  # what the parity tests assert on relative errors
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same bytes across installs
DPI = 110


# --------------------------------------------------------------------------------------------
# Settings: one full and one quick instance
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    # loss curves: both backends, same init, same batches
    curve_config: dict
    curve_steps: int
    curve_batch: int
    # attention maps: a small npgpt GPT trained here
    attn_config: dict
    attn_steps: int
    attn_batch: int
    # parity bars
    parity_config: dict
    parity_batch: int


FULL = Settings(
    curve_config=dict(block_size=32, n_layer=2, n_head=4, n_embd=64),
    curve_steps=200, curve_batch=16,
    attn_config=dict(block_size=32, n_layer=3, n_head=4, n_embd=64),
    attn_steps=800, attn_batch=32,
    parity_config=dict(block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True),
    parity_batch=4,
)
QUICK = Settings(
    curve_config=dict(block_size=8, n_layer=1, n_head=2, n_embd=16),
    curve_steps=20, curve_batch=4,
    attn_config=dict(block_size=32, n_layer=2, n_head=2, n_embd=16),
    attn_steps=30, attn_batch=8,
    parity_config=dict(block_size=8, n_layer=1, n_head=2, n_embd=16, bias=True),
    parity_batch=2,
)

PROMPT = "ROMEO:\nWhat light"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_data(path: str | None = None) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """Tokenizer and the (train, val) token arrays of Tiny Shakespeare (see gptapp.data.load_text)."""
    text = load_text(path)
    tok = CharTokenizer.from_text(text)
    train, val = train_val_split(tok.encode(text))
    return tok, train, val


# --------------------------------------------------------------------------------------------
# (a) Loss curves: the same training run in npgpt and in torchgpt
# --------------------------------------------------------------------------------------------

def train_both(train_data: np.ndarray, config: GPTConfig, steps: int, batch_size: int = 16,
               dtype=np.float64, seed: int = 1337, learning_rate: float = 1e-3,
               weight_decay: float = 0.1, betas=(0.9, 0.99), grad_clip: float = 1.0,
               warmup_iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Train npgpt.GPT (npgpt.optim.AdamW) and torchgpt.GPT (torch.optim.AdamW) side by side.

    Same initial weights (npgpt's init, copied with torchgpt.convert.load_params), the same batches
    from npgpt.data.get_batch, nanoGPT's recipe on both sides: warmup + cosine learning rate,
    gradient clipping at `grad_clip`, weight decay on matrices only. Returns the two loss
    sequences (steps,) as float64 arrays.
    """
    import torch
    from torchgpt import GPT as TorchGPT
    from torchgpt import load_params

    torch_dtype = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
    np_model = GPT(config, seed=seed, dtype=dtype)
    t_model = TorchGPT(config, attention="explicit").to(torch_dtype)  # explicit = npgpt's formula
    load_params(t_model, np_model.params)
    np_opt = AdamW(np_model.params, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    t_opt = t_model.configure_optimizers(weight_decay, learning_rate, betas, "cpu")
    rng = np.random.default_rng(seed)
    np_losses, t_losses = [], []
    for it in range(steps):
        lr = cosine_lr(it, learning_rate, warmup_iters, steps, learning_rate / 10)
        x, y = get_batch(train_data, batch_size, config.block_size, rng)  # one batch for both

        _, loss = np_model.forward(x, y)
        grads = np_model.backward()
        if grad_clip > 0:
            clip_grad_norm(grads, grad_clip)
        np_opt.step(grads, lr=lr)
        np_losses.append(loss)

        _, t_loss = t_model(torch.from_numpy(x), torch.from_numpy(y))
        t_opt.zero_grad(set_to_none=True)
        t_loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(t_model.parameters(), grad_clip)
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.step()
        t_losses.append(t_loss.item())
    return np.array(np_losses, dtype=np.float64), np.array(t_losses, dtype=np.float64)


def plot_loss_curves(curves: dict, path: Path, config: GPTConfig, batch_size: int) -> None:
    """curves: {"float64": (np_losses, torch_losses), "float32": (...)}."""
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 2]))
    np64, t64 = curves["float64"]
    steps = np.arange(len(np64))
    ax.plot(steps, np64, color="tab:blue", lw=2.6, alpha=0.55, label="npgpt (NumPy, hand-written backward)")
    ax.plot(steps, t64, color="black", lw=1.0, ls=(0, (4, 3)), label="torchgpt (PyTorch autograd)")
    ax.set_ylabel("training loss (float64)")
    ax.set_title(f"Same init, same batches: {config.n_layer} layers, {config.n_head} heads, "
                 f"{config.n_embd} channels, block {config.block_size}, batch {batch_size}", fontsize=10)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)

    colors = {"float64": "tab:blue", "float32": "tab:orange"}
    for name, (a, b) in curves.items():
        diff = np.abs(a - b)
        shown = np.where(diff > 0, diff, np.nan)  # exact zeros have no place on a log axis
        zeros = int(np.sum(diff == 0))
        ax_diff.semilogy(steps, shown, ".", ms=3.5, color=colors.get(name),
                         label=f"{name}: max {diff.max():.1e}, {zeros}/{len(diff)} steps exactly equal")
    ax_diff.set_ylabel("|loss_np - loss_torch|")
    ax_diff.set_xlabel("step (AdamW, warmup + cosine lr, grad clip 1.0)")
    ax_diff.legend(frameon=False, loc="center left", fontsize=8)
    ax_diff.grid(alpha=0.3, which="major")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (b) Attention maps of a trained model
# --------------------------------------------------------------------------------------------

def train_npgpt(train_data: np.ndarray, config: GPTConfig, steps: int, batch_size: int,
                seed: int = 1337, learning_rate: float = 2e-3) -> tuple[GPT, float]:
    """A short npgpt training run (float32, AdamW, warmup + cosine). Returns (model, last loss)."""
    model = GPT(config, seed=seed, dtype=np.float32)
    opt = AdamW(model.params, lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    losses = []
    for it in range(steps):
        _, loss = model.forward(*get_batch(train_data, batch_size, config.block_size, rng))
        grads = model.backward()
        clip_grad_norm(grads, 1.0)
        opt.step(grads, lr=cosine_lr(it, learning_rate, min(100, steps // 10), steps, learning_rate / 10))
        losses.append(loss)
    return model.eval(), float(np.mean(losses[-20:]))


class FigureError(Exception):
    """A problem with the script's input that the user can fix; the message is one line."""


def load_checkpoint_model(path: str, tok: CharTokenizer) -> tuple[GPT, CharTokenizer]:
    """(model, tokenizer) from a checkpoint that gptapp.checkpoint.load_checkpoint reads (.npz, and
    .pt / nanoGPT files through gptapp.torch_checkpoint). FigureError if it can't be used."""
    from gptapp.checkpoint import CheckpointError, load_checkpoint
    try:
        from gptapp.torch_checkpoint import load_torch_checkpoint
    except ImportError:
        load_torch_checkpoint = None
    try:
        ckpt = load_checkpoint(path, torch_loader=load_torch_checkpoint)
    except CheckpointError as exc:
        raise FigureError(str(exc)) from exc
    if ckpt.model != "gpt":
        raise FigureError(f"--ckpt {path} holds a {ckpt.model} model, which has no attention; "
                          "pass a GPT checkpoint or leave --ckpt out to train one here")
    if ckpt.vocab is not None:
        tok = CharTokenizer(ckpt.vocab)
    elif ckpt.gpt_config.vocab_size != tok.vocab_size:
        raise FigureError(f"--ckpt {path} has no vocabulary and its vocab_size {ckpt.gpt_config.vocab_size} "
                          f"differs from the data's {tok.vocab_size}; pass the text it was trained on")
    model = GPT(ckpt.gpt_config, dtype=np.float32)
    for name, value in ckpt.params.items():
        model.params[name][...] = value
    return model.eval(), tok


def attention_maps(model: GPT, idx: np.ndarray) -> np.ndarray:
    """Attention probabilities (n_layer, n_head, T, T) of the single sequence idx (1, T).

    Recomputed from the parameters with the layer functions: at each block, ln_1 -> c_attn ->
    split q, k -> attention_probs (scaled, causally masked softmax); then block_forward moves the
    residual stream on to the next block.
    """
    cfg, P = model.config, model.params
    x, _ = embedding_forward(idx, P["transformer.wte.weight"], P["transformer.wpe.weight"])  # (1, T, C)
    maps = []
    for i in range(cfg.n_layer):
        p = model.block_params(i)
        h, _ = layernorm_forward(x, p["ln_1.weight"], p.get("ln_1.bias"))
        qkv, _ = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (1, T, 3C)
        q, k, _ = (split_heads(part, cfg.n_head) for part in np.split(qkv, 3, axis=-1))  # (1, nh, T, hs)
        maps.append(attention_probs(q, k, 1.0 / np.sqrt(cfg.head_size))[0])  # (nh, T, T)
        x, _ = block_forward(x, p, BlockOptions.of(cfg))
    return np.stack(maps)  # (L, nh, T, T)


def char_label(c: str) -> str:
    return {"\n": "\\n", " ": "␣"}.get(c, c)


def plot_attention(maps: np.ndarray, prompt: str, path: Path, subtitle: str) -> None:
    L, nh, T, _ = maps.shape
    size = 2.6
    fig, axes = plt.subplots(L, nh, figsize=(size * nh + 1.0, size * L + 0.8), squeeze=False,
                             layout="constrained")
    labels = [char_label(c) for c in prompt]
    for i in range(L):
        for j in range(nh):
            ax = axes[i, j]
            im = ax.imshow(maps[i, j], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, fontsize=6.5, family="monospace")
            ax.set_yticklabels(labels, fontsize=6.5, family="monospace")
            ax.tick_params(length=0, pad=1)
            if i == 0:
                ax.set_title(f"head {j}", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"layer {i}\nquery (row)", fontsize=9)
            if i == L - 1:
                ax.set_xlabel("key (column)", fontsize=8)
    fig.suptitle(f"Attention probabilities for the prompt {prompt!r}\n{subtitle}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.5, pad=0.01, label="attention weight (each row sums to 1)")
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (c) Parity of every gradient
# --------------------------------------------------------------------------------------------

def gradient_parity(dtype, config: GPTConfig, batch_size: int = 4, seed: int = 0,
                    data: np.ndarray | None = None) -> list[tuple[str, tuple, float, float]]:
    """npgpt's hand-written gradients against torch autograd, both in `dtype`, same weights/batch.

    Returns [(name, shape, max_abs, rel)] per parameter, rel = ||g_np - g_torch|| / ||g_torch||.
    """
    import torch
    from torchgpt import GPT as TorchGPT
    from torchgpt import load_params

    rng = np.random.default_rng(seed)
    np_model = GPT(config, seed=seed, dtype=dtype)
    for name, p in np_model.params.items():  # move off the init (unit gains, zero biases)
        p += (0.02 * rng.standard_normal(p.shape)).astype(p.dtype)
    torch_dtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    t_model = TorchGPT(config, attention="explicit").to(torch_dtype)
    load_params(t_model, np_model.params)
    if data is None:
        x = rng.integers(config.vocab_size, size=(batch_size, config.block_size))
        y = rng.integers(config.vocab_size, size=(batch_size, config.block_size))
    else:
        x, y = get_batch(data, batch_size, config.block_size, rng)
    np_model.forward(x, y)
    np_grads = np_model.backward()
    _, loss = t_model(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    rows = []
    for name, p in t_model.named_parameters():
        g_t = p.grad.double().numpy()
        g_np = np_grads[name].astype(np.float64)
        rows.append((name, tuple(g_np.shape), float(np.max(np.abs(g_np - g_t))), rel_error(g_np, g_t)))
    return rows


def parity_rows(dtype_name: str, config: GPTConfig, batch_size: int, use_report: bool = True):
    """(rows, source): parity_tests.report.parity_table when it is importable and answers,
    otherwise gradient_parity computed here, so this script never waits on another module."""
    if use_report:
        try:
            report = importlib.import_module("parity_tests.report")
            table = report.parity_table
        except (ImportError, AttributeError):
            pass
        else:
            try:
                rows = [(str(n), tuple(s), float(a), float(r)) for n, s, a, r in table(np.dtype(dtype_name))]
                if rows:
                    return rows, "parity_tests.report.parity_table"
            except Exception as exc:  # noqa: BLE001 - a broken report must not break the figures
                print(f"figures: parity_tests.report.parity_table({dtype_name}) failed ({exc!r}); "
                      "computing the gradients here instead", file=sys.stderr)
    return gradient_parity(np.dtype(dtype_name), config, batch_size), "docs/figures.py gradient_parity"


def short_name(name: str) -> str:
    return name.replace("transformer.", "").replace(".weight", ".w").replace(".bias", ".b")


FORWARD_ROWS = ("logits", "loss")  # parity_table puts the forward outputs before the gradients


def plot_parity(tables: dict, path: Path, source: str) -> None:
    """tables: {"float64": rows, "float32": rows}, rows as parity_rows returns them."""
    names = [r[0] for r in tables["float64"]]
    rel = {k: {r[0]: r[3] for r in rows} for k, rows in tables.items()}
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(7.5, 0.26 * n + 2.5), 5.4))
    xs = np.arange(n)
    width = 0.4
    floor = 1e-18  # an exactly-equal tensor (rel 0) is drawn at the floor
    colors = {"float64": "tab:blue", "float32": "tab:orange"}
    for dname, offset in (("float64", -width / 2), ("float32", width / 2)):
        raw = np.array([rel[dname].get(nm, np.nan) for nm in names])
        vals = np.maximum(raw, floor)
        ax.bar(xs + offset, vals - floor, width, color=colors[dname], bottom=floor,
               label=f"{dname} (max {np.nanmax(raw):.1e})")
        for x in xs[raw == 0.0]:  # bit-identical: no bar to draw, so say so
            ax.text(x + offset, floor * 3, "0", ha="center", va="bottom", fontsize=7, color=colors[dname])
        ax.axhline(BOUNDS[dname], color=colors[dname], ls="--", lw=1.2)
        ax.text(n - 0.5, BOUNDS[dname] * 2.5, f"{dname} gradient bound {BOUNDS[dname]:.0e}", ha="right",
                va="bottom", fontsize=8, color=colors[dname],
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1))
    n_fwd = sum(nm in FORWARD_ROWS for nm in names)
    if n_fwd:
        ax.axvline(n_fwd - 0.5, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(floor, 1e-2)
    ax.set_xticks(xs)
    ax.set_xticklabels([short_name(nm) for nm in names], rotation=70, ha="right", fontsize=7,
                       family="monospace")
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("||npgpt - torch|| / ||torch||")
    what = "forward outputs and the gradient of every parameter" if n_fwd else "gradient of every parameter"
    ax.set_title(f"npgpt (hand-written backward) vs torch autograd: {what}", fontsize=10)
    ax.legend(frameon=False, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.99, 0.01, f"source: {source}", ha="right", va="bottom", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def make_figures(out: Path, data_path: str | None = None, quick: bool = False,
                 ckpt: str | None = None) -> list[Path]:
    s = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    tok, train, _ = load_data(data_path)
    V = tok.vocab_size
    loaded = load_checkpoint_model(ckpt, tok) if ckpt else None  # fail before the long parts
    written = []

    t0 = time.perf_counter()
    config = GPTConfig(vocab_size=V, **s.curve_config)
    curves = {name: train_both(train, config, s.curve_steps, s.curve_batch, dtype=np.dtype(name))
              for name in ("float64", "float32")}
    for name, (a, b) in curves.items():
        print(f"loss curves {name}: final loss np {a[-1]:.4f} torch {b[-1]:.4f}, "
              f"max |diff| {np.max(np.abs(a - b)):.2e}")
    plot_loss_curves(curves, out / "loss_curves.png", config, s.curve_batch)
    written.append(out / "loss_curves.png")
    print(f"  wrote {out / 'loss_curves.png'} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    if loaded is not None:
        model, ckpt_tok = loaded
        cfg = model.config
        subtitle = (f"checkpoint {Path(ckpt).name}: {cfg.n_layer} layers x {cfg.n_head} heads, "
                    f"{cfg.n_embd} channels")
    else:
        config = GPTConfig(vocab_size=V, **s.attn_config)
        model, loss = train_npgpt(train, config, s.attn_steps, s.attn_batch)
        subtitle = (f"npgpt GPT, {config.n_layer} layers x {config.n_head} heads, {config.n_embd} channels, "
                    f"after {s.attn_steps} AdamW steps (train loss {loss:.2f})")
    prompt = PROMPT[: model.config.block_size]
    maps = attention_maps(model, (ckpt_tok if loaded is not None else tok).encode(prompt)[None, :])
    plot_attention(maps, prompt, out / "attention_maps.png", subtitle)
    written.append(out / "attention_maps.png")
    print(f"  wrote {out / 'attention_maps.png'} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    config = GPTConfig(vocab_size=V, **s.parity_config)
    tables, sources = {}, set()
    for name in ("float64", "float32"):
        tables[name], src = parity_rows(name, config, s.parity_batch, use_report=not quick)
        sources.add(src)
        worst = max(tables[name], key=lambda r: r[3])
        print(f"parity {name}: worst relative error {worst[3]:.2e} ({worst[0]}), source {src}")
    plot_parity(tables, out / "parity_errors.png", ", ".join(sorted(sources)))
    written.append(out / "parity_errors.png")
    print(f"  wrote {out / 'parity_errors.png'} ({time.perf_counter() - t0:.1f}s)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "figures"), help="output folder")
    parser.add_argument("--data", default=None,
                        help="Tiny Shakespeare input.txt (default: $NPGPT_DATA, the cache, or a download)")
    parser.add_argument("--ckpt", default=None,
                        help="a checkpoint of train_np.py / train_torch.py to draw the attention maps from "
                             "(default: train a small GPT here)")
    parser.add_argument("--quick", action="store_true", help="tiny models and runs, a few seconds in all")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        make_figures(Path(args.out), args.data, args.quick, args.ckpt)
    except (DataError, FigureError) as exc:
        print(f"figures: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
