"""Generation speed with and without the KV cache, npgpt and torchgpt, at block size 256.

    python bench/generate.py                  # both shapes, all cores
    python bench/generate.py --tokens 255 --repeats 5 --threads 1

From a one-token prompt, batch 1, greedy decoding (temperature 0, so cached and uncached runs must
produce the same tokens, which is checked), `tokens` new tokens (default 255: exactly fills the
256-position window; beyond it the positions shift and both paths recompute the whole window).
    npgpt cached     npgpt.fast.GPT.generate(use_cache=True): each new token runs one position through the
                     layers, attending over the cached keys and values;
    npgpt uncached   GPT.generate(use_cache=False): the whole context again for every token;
    torch cached     torchgpt's GPT.generate (KV cache);
    torch uncached   the same model called on the whole context for every token (written here).
The backends alternate within each repeat; the median time is reported as tokens/s.
"""
from __future__ import annotations

import common  # noqa: E402

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import npgpt.fast  # noqa: E402
import torchgpt  # noqa: E402
from npgpt.sampling import sample_next  # noqa: E402

VOCAB = common.VOCAB
TARGET = 5.0  # npgpt with the cache at least 5x faster than without, at block 256


def shapes() -> dict:
    presets = common.presets()
    return {
        "cpu preset, block 256": replace(presets["cpu"], block_size=256),
        "shakespeare-char (6x384), block 256": replace(presets["shakespeare-char"], dropout=0.0),
    }


@torch.no_grad()
def torch_generate_uncached(model, idx: torch.Tensor, n: int) -> torch.Tensor:
    """What torchgpt's generate does, minus the cache: the whole cropped context every token."""
    bs = model.config.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -bs:])  # (B, T, V)
        nxt = sample_next(logits[:, -1, :].double().numpy(), 0.0, None, None)  # (B,) greedy, as generate()
        idx = torch.cat((idx, torch.from_numpy(nxt).view(-1, 1)), dim=1)
    return idx


def bench_shape(cfg, tokens: int, repeats: int) -> dict:
    gcfg = cfg.gpt_config(VOCAB)
    np_model = npgpt.fast.GPT(gcfg, seed=0).eval()
    torch.manual_seed(0)
    t_model = torchgpt.GPT(gcfg).eval()
    prompt = np.zeros((1, 1), dtype=np.int64)
    runs = {
        "npgpt cached": lambda: np_model.generate(prompt, tokens, temperature=0.0, use_cache=True),
        "npgpt uncached": lambda: np_model.generate(prompt, tokens, temperature=0.0, use_cache=False),
        "torch cached": lambda: t_model.generate(torch.from_numpy(prompt), tokens, temperature=0.0).numpy(),
        "torch uncached": lambda: torch_generate_uncached(t_model, torch.from_numpy(prompt), tokens).numpy(),
    }
    outputs = {k: f() for k, f in runs.items()}  # warm-up, and the tokens to compare
    times = {k: [] for k in runs}
    for r in range(repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    res = {k: {"tokens_per_s": tokens / common.median(ts), "seconds": common.median(ts)} for k, ts in times.items()}
    res["npgpt speedup"] = res["npgpt cached"]["tokens_per_s"] / res["npgpt uncached"]["tokens_per_s"]
    res["torch speedup"] = res["torch cached"]["tokens_per_s"] / res["torch uncached"]["tokens_per_s"]
    res["npgpt same tokens"] = bool(np.array_equal(outputs["npgpt cached"], outputs["npgpt uncached"]))
    res["torch same tokens"] = bool(np.array_equal(outputs["torch cached"], outputs["torch uncached"]))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--tokens", type=int, default=255)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    common.torch_threads(args.threads)
    info = common.machine_info(args.threads, HOW)
    common.print_info(f"generate: {args.tokens} new tokens from a 1-token prompt, batch 1, greedy", info)
    results = {"machine": info, "command": " ".join(sys.argv)}
    for name, cfg in shapes().items():
        res = bench_shape(cfg, args.tokens, args.repeats)
        results[name] = res
        print(f"\n-- {name}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} channels")
        print(f"   {'':16s} {'tokens/s':>10s}")
        for k in ("npgpt cached", "npgpt uncached", "torch cached", "torch uncached"):
            print(f"   {k:16s} {res[k]['tokens_per_s']:10.1f}")
        verdict = common.verdict(res["npgpt speedup"], TARGET, at_least=True)
        print(f"   cache speedup: npgpt {res['npgpt speedup']:.1f}x (target >= {TARGET:g}x: {verdict}), "
              f"torch {res['torch speedup']:.1f}x")
        print(f"   cached == uncached tokens: npgpt {res['npgpt same tokens']}, torch {res['torch same tokens']}",
              flush=True)
    return common.finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
