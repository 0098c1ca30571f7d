"""GPT-2 small's shape (12 layers, 768 channels, 12 heads, 1024 positions, vocabulary 50257; layernorm
with bias, learned positions, tanh GELU, tied head), random weights, float32, on the CPU, in one run:
generation with the KV cache (npgpt.fast vs torchgpt eager vs transformers' GPT2LMHeadModel, the same
weights) and one fine-tuning step's time and peak memory (npgpt.fast vs torchgpt), each as a ratio to
torchgpt, measured in the same run.

    python bench/gpt2.py                         # generate, step and memory, all cores
    python bench/gpt2.py --mode generate --repeats 5
    python bench/gpt2.py --mode step --batch_size 4 --seq_len 256 --rounds 5
    python bench/gpt2.py --mode memory --threads 1
    python bench/gpt2.py --quick                 # a tiny shape in seconds: the smoke test's run

torchgpt runs eagerly (no torch.compile) with its default attention (SDPA); transformers' model gets
our weights through gptapp.hf's mapping (ours_to_hf) and is checked on the prompt's logits before it is
timed.

generate: batch 1, a `prompt`-token random prompt, `tokens` new tokens, greedy (the three do the same
work), each backend's KV cache (transformers: generate(use_cache=True), eager attention, no EOS stop);
the runs alternate in this process; median time. step: forward, backward, clip_grad_norm and AdamW as
the training scripts do them, on the same random batches, each backend in a worker process of its own,
`rounds` interleaved blocks of `block` steps; median. memory: one step in each of `repeats` fresh
workers per backend (with --mode all the step's workers measure it first, before their timed steps):
the peak RSS (VmHWM) above the RSS after the imports, as bench/step_time.py --mode memory measures it
(`total`: parameters, optimizer state and the step's peak; `step peak`: above the RSS just before the
step). Each worker loads its own library only, as a user's program would: npgpt.fast's no torch (fast.GPT
tunes its allocator itself), torch's no npgpt.fast (torch's default allocator; npgpt's initial weights).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common  # sets sys.path; imports neither numpy nor torch

THREADS = common.threads_from_argv()
HOW = common.limit_threads(THREADS)  # before numpy or torch loads

TARGETS = {"generate": 1.5, "step": 1.3, "memory": 1.3}  # npgpt.fast / torch at most (generate: torch / fast)
GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
QUICK = dict(vocab_size=101, block_size=64, n_layer=2, n_head=2, n_embd=32)  # --quick: seconds
PAUSE_S = 0.3  # before each block: idle OpenBLAS/OpenMP threads spin a while after their last call
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0  # nanoGPT's GPT-2 fine-tuning settings


def gpt_config(quick: bool):
    from npgpt import GPTConfig
    return GPTConfig(**(QUICK if quick else GPT2_SMALL), dropout=0.0, bias=True, activation="gelu_tanh",
                     tie_weights=True)


def describe(cfg) -> str:
    return (f"{cfg.n_layer} layers, {cfg.n_embd} channels, {cfg.n_head} heads, {cfg.block_size} positions, "
            f"vocabulary {cfg.vocab_size}, {cfg.activation}, layernorm with bias, learned positions, "
            f"{'tied' if cfg.tie_weights else 'untied'} head, float32, random weights (seed 0)")


# --- The three models on the same weights ---------------------------------------------------------
def npgpt_model(cfg):
    from npgpt.fast import GPT
    return GPT(cfg, seed=0)  # float32


def torch_model(cfg, params):
    import torchgpt
    from torchgpt.convert import load_params
    model = torchgpt.GPT(cfg)  # attention="sdpa", float32
    load_params(model, params)
    return model


def hf_model(cfg, params):
    """transformers' GPT2LMHeadModel (eager attention) holding `params`, through gptapp.hf's mapping:
    config_to_hf's GPT2Config, ours_to_hf's state dict (Conv1D weights transposed, the head tied)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptapp.hf import config_to_hf, gpt2_shaped, ours_to_hf
    why = gpt2_shaped(cfg)
    if why is not None:
        raise ValueError(f"transformers' GPT-2 cannot hold this model: {why}")
    model = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg, np.float32), attn_implementation="eager")).eval()
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"transformers chose {model.config._attn_implementation} attention, not eager")
    own, theirs = dict(model.named_parameters()), ours_to_hf(params)
    if set(own) != set(theirs):
        raise ValueError(f"HF GPT-2 names differ from ours: {sorted(set(own) ^ set(theirs))}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(torch.from_numpy(theirs[name]))
    model.generation_config.eos_token_id = None  # generate exactly the tokens asked for
    model.generation_config.pad_token_id = 0
    return model


# --- generate: in this process -------------------------------------------------------------------------
class Runs(dict):
    """{backend: run()}, and hf_logits_error: transformers' logits of the prompt against npgpt.fast's
    (normwise relative), None without transformers."""
    hf_logits_error = None


def generate_runs(args, cfg) -> Runs:
    """{backend: run()} each returning the (1, prompt + tokens) ids, greedy, with its KV cache."""
    import numpy as np
    import torch
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.prompt))
    fast = npgpt_model(cfg).eval()
    runs = Runs({"npgpt.fast": lambda: fast.generate(prompt, args.tokens, temperature=0.0, use_cache=True)})
    tm = torch_model(cfg, fast.params).eval()
    runs["torchgpt"] = lambda: tm.generate(torch.from_numpy(prompt), args.tokens, 0.0).numpy()
    if not args.no_hf:
        hf = hf_model(cfg, fast.params)
        with torch.no_grad():  # the mapping's check: transformers' logits of the prompt against ours
            theirs = hf(torch.from_numpy(prompt)).logits.numpy()
        ours, _ = fast.forward(prompt)
        runs.hf_logits_error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(ours))

        @torch.no_grad()
        def hf_run():
            ids = torch.from_numpy(prompt)
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                               min_new_tokens=args.tokens, do_sample=False, use_cache=True).numpy()
        runs["transformers"] = hf_run
    return runs


def generate_mode(args, cfg) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    runs = generate_runs(args, cfg)
    outputs = {k: f() for k, f in runs.items()}  # warm-up (numba compiles), and the tokens to compare
    times = {k: [] for k in runs}
    for r in range(args.repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    res = {k: {"tokens_per_s": args.tokens / common.median(t), "seconds": common.median(t),
               "new_tokens": int(outputs[k].shape[1] - args.prompt),
               "same_tokens_as_npgpt.fast": bool(np.array_equal(outputs[k], outputs["npgpt.fast"]))}
           for k, t in times.items()}
    print(f"\n   generate: {args.tokens} new tokens from a {args.prompt}-token prompt, batch 1, greedy, KV cache; "
          f"median of {args.repeats}")
    print(f"   {'backend':14s} {'tokens/s':>9s} {'s':>8s} {'torch / it':>11s}  same tokens as npgpt.fast")
    for k, r in res.items():
        r["speed_ratio_to_torch"] = r["tokens_per_s"] / res["torchgpt"]["tokens_per_s"]
        print(f"   {k:14s} {r['tokens_per_s']:9.1f} {r['seconds']:8.2f} {1 / r['speed_ratio_to_torch']:11.2f}  "
              f"{r['same_tokens_as_npgpt.fast']}")
    if runs.hf_logits_error is not None:
        res["hf_logits_error"] = runs.hf_logits_error
        print(f"   transformers' logits of the prompt against npgpt.fast's (the weights' mapping): "
              f"{runs.hf_logits_error:.1e} normwise")
    ratio = res["npgpt.fast"]["seconds"] / res["torchgpt"]["seconds"]
    res["ratio"] = ratio
    print(f"   time ratio npgpt.fast / torchgpt = {ratio:.2f}   (target <= {TARGETS['generate']}: "
          f"{common.verdict(ratio, TARGETS['generate'])})", flush=True)
    return res


# --- step and memory: one backend per worker process ----------------------------------------------
def make_step(backend: str, cfg):
    """One fine-tuning step as the training scripts run it: step(x, y) -> its (forward, backward, clip +
    AdamW) seconds; step.as_input turns a NumPy batch into the backend's input. torch gets npgpt's
    initial weights (npgpt.model.init_params, seed 0) without npgpt.fast: its process keeps torch's
    default allocator, as a user's would."""
    if backend == "torch":
        import numpy as np
        import torch
        from npgpt.model import init_params
        model = torch_model(cfg, init_params(cfg, 0, np.float32)).train()
        opt = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
        params, as_input = list(model.parameters()), torch.from_numpy
        forward, backward = (lambda x, y: model(x, y)[1]), (lambda loss: loss.backward())

        def update(_):
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from npgpt.fast import AdamW, clip_grad_norm
        model = npgpt_model(cfg)  # fast.GPT tunes its process's allocator itself
        opt = AdamW(model.params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        forward, backward, as_input = model.forward, (lambda _: model.backward()), (lambda a: a)

        def update(grads):
            clip_grad_norm(grads, GRAD_CLIP)
            opt.step(grads)

    def step(x, y):
        t0 = time.perf_counter()
        out = forward(x, y)
        t1 = time.perf_counter()
        grads = backward(out)
        del out
        t2 = time.perf_counter()
        update(grads)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step.model, step.as_input = model, as_input
    return step


def worker(args) -> None:
    """One backend in a fresh process. Its first answer: memory's figures of one step after the warm-up
    (modes memory and all; see step_memory) or "ready" (mode step). memory then exits; step and all
    answer each line K with the JSON list of K (forward, backward, update) seconds, until stdin closes."""
    import numpy as np
    if args.worker == "torch":  # each worker loads its backend's library only
        import torch
        import torchgpt  # noqa: F401
        torch.set_num_threads(args.threads)
    else:
        import npgpt.fast  # noqa: F401
    cfg = gpt_config(args.quick)
    common.trim()
    rss_imports = common.status_kb("VmRSS")
    step = make_step(args.worker, cfg)
    rng = np.random.default_rng(0)
    data = [tuple(step.as_input(a) for a in rng.integers(0, cfg.vocab_size, (2, args.batch_size, args.seq_len)))
            for _ in range(1 if args.mode == "memory" else 4)]
    for i in range(args.warmup):
        step(*data[i % len(data)])
    first = "ready" if args.mode == "step" else step_memory(args.worker, step, data[0], rss_imports)
    print(json.dumps(first), flush=True)
    if args.mode == "memory":
        return
    i = args.warmup + (args.mode != "step")
    for line in sys.stdin:
        time.sleep(0 if args.quick else PAUSE_S)  # the other worker's idle BLAS/OpenMP threads stop spinning
        times = [step(*data[(i + k) % len(data)]) for k in range(int(line))]
        i += len(times)
        print(json.dumps(times), flush=True)


def step_memory(backend: str, step, xy, rss_imports: int) -> dict:
    if backend != "torch":
        step.model._cache = None  # the activations it keeps for a second backward(); torch keeps none
    return common.step_memory(lambda: step(*xy), rss_imports)


def start(args, backend: str, mode: str):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--mode", mode,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len)] + (["--quick"] if args.quick else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, common.ask(proc)


BACKENDS = ("npgpt.fast", "torch")


def step_mode(args, cfg, memory_runs: dict) -> dict:
    """With --mode all each worker first measures memory (fresh, after the warm-up) into memory_runs."""
    procs = {}
    for b in BACKENDS:  # one at a time: none warms up under another's load
        procs[b], first = start(args, b, args.mode if args.mode == "all" else "step")
        if args.mode == "all":
            memory_runs[b].append(first)
    times = {b: [] for b in BACKENDS}
    try:
        for r in range(args.rounds):
            for b in BACKENDS[r % 2:] + BACKENDS[:r % 2]:
                times[b] += common.ask(procs[b], args.block)
    finally:
        for proc in procs.values():
            common.stop(proc)
    res = {}
    for b, ts in times.items():
        q1, q3 = common.quartiles([sum(p) for p in ts])
        res[b] = {"step_ms": 1e3 * common.median([sum(p) for p in ts]), "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                  **{f"{part}_ms": 1e3 * common.median([p[j] for p in ts])
                     for j, part in enumerate(("forward", "backward", "update"))}, "steps": len(ts)}
    print(f"\n   step: forward + backward + clip + AdamW, batch {args.batch_size} x {args.seq_len} tokens; "
          f"median of {args.rounds} x {args.block} interleaved steps")
    print(f"   {'backend':11s} {'step ms':>9s} {'(q1-q3)':>15s} {'forward':>8s} {'backward':>9s} {'update':>8s} "
          f"{'/ torch':>8s}")
    for b, r in res.items():
        print(f"   {b:11s} {r['step_ms']:9.0f} {r['q1_ms']:7.0f}-{r['q3_ms']:<7.0f} {r['forward_ms']:8.0f} "
              f"{r['backward_ms']:9.0f} {r['update_ms']:8.0f} {r['step_ms'] / res['torch']['step_ms']:8.2f}")
    res["ratio"] = res["npgpt.fast"]["step_ms"] / res["torch"]["step_ms"]
    print(f"   ratio npgpt.fast / torch = {res['ratio']:.2f}   (target <= {TARGETS['step']}: "
          f"{common.verdict(res['ratio'], TARGETS['step'])})", flush=True)
    return res


def memory_mode(args, cfg, memory_runs: dict) -> dict:
    """The figures of `repeats` fresh workers per backend: the step workers' (--mode all), then new ones."""
    runs, shared = memory_runs, len(memory_runs["torch"])
    for _ in range(args.repeats - shared):
        for b in BACKENDS:  # alternate the backends
            proc, figures = start(args, b, "memory")
            common.stop(proc)
            runs[b].append(figures)
    res = {b: {k: common.median([r[k] for r in rs]) for k in rs[0]} for b, rs in runs.items()}
    note = " (the first of each: the step workers', before their timed steps)" if shared else ""
    print(f"\n   memory: peak RSS of one step, batch {args.batch_size} x {args.seq_len} tokens; median of "
          f"{len(runs['torch'])} fresh workers each{note}")
    print(f"   {'backend':11s} {'total MB':>9s} {'state MB':>9s} {'step peak MB':>13s} {'total / torch':>14s}")
    for b, r in res.items():
        print(f"   {b:11s} {r['total_mb']:9.0f} {r['state_mb']:9.0f} {r['step_peak_mb']:13.0f} "
              f"{r['total_mb'] / res['torch']['total_mb']:14.2f}")
    res["ratio"] = res["npgpt.fast"]["total_mb"] / res["torch"]["total_mb"]
    res["ratio_step_peak"] = res["npgpt.fast"]["step_peak_mb"] / res["torch"]["step_peak_mb"]
    print(f"   ratio npgpt.fast / torch = {res['ratio']:.2f} total, {res['ratio_step_peak']:.2f} step peak   "
          f"(target <= {TARGETS['memory']}: {common.verdict(res['ratio'], TARGETS['memory'])})", flush=True)
    return res


# --- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", default="all", choices=("all", "generate", "step", "memory"))
    p.add_argument("--threads", type=int, default=THREADS, help="for BLAS, OpenMP and torch (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few tokens and steps: a smoke run")
    p.add_argument("--prompt", type=int, default=None, help="generate: prompt tokens (default 100)")
    p.add_argument("--tokens", type=int, default=None, help="generate: new tokens (default 200)")
    p.add_argument("--repeats", type=int, default=None, help="generate: timed runs; memory: workers (default 3)")
    p.add_argument("--no_hf", action="store_true", help="generate: without transformers")
    p.add_argument("--batch_size", type=int, default=None, help="step, memory: sequences a step (default 4)")
    p.add_argument("--seq_len", type=int, default=None, help="step, memory: tokens a sequence (default 256)")
    p.add_argument("--rounds", type=int, default=None, help="step: interleaved rounds (default 3)")
    p.add_argument("--block", type=int, default=None, help="step: timed steps per backend per round (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="step, memory: steps before measuring (default 2)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(prompt=100, tokens=200, repeats=3, batch_size=4, seq_len=256, rounds=3, block=2, warmup=2)
    quick = dict(prompt=8, tokens=8, repeats=1, batch_size=2, seq_len=16, rounds=2, block=1, warmup=1)
    for k, v in (quick if args.quick else defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cfg = gpt_config(args.quick)
    error = next((f"--{name} must be a positive integer, got {getattr(args, name)}" for name in
                  ("prompt", "tokens", "repeats", "batch_size", "seq_len", "rounds", "block", "threads")
                  if getattr(args, name) <= 0), None)
    if error is None and (args.prompt + args.tokens > cfg.block_size or args.seq_len > cfg.block_size):
        error = (f"--prompt {args.prompt} + --tokens {args.tokens} and --seq_len {args.seq_len} must each fit in "
                 f"the model's {cfg.block_size} positions")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.worker:
        worker(args)
        return 0
    info = common.machine_info(args.threads, HOW)
    if not args.no_hf and args.mode in ("all", "generate"):
        import transformers
        info["transformers"] = transformers.__version__
    common.print_info("gpt2: npgpt.fast vs torchgpt (eager) vs transformers, GPT-2 small's shape on the CPU", info)
    print(f"   model: {describe(cfg)}{' (--quick: a tiny shape, not GPT-2 small)' if args.quick else ''}", flush=True)
    results = {"machine": info, "command": " ".join(sys.argv), "model": describe(cfg), "quick": args.quick,
               "settings": {k: getattr(args, k) for k in defaults}}
    modes = ("generate", "step", "memory") if args.mode == "all" else (args.mode,)
    memory_runs = {b: [] for b in BACKENDS}  # memory's figures, the step workers' first answers with --mode all
    for mode in modes:
        results[mode] = (generate_mode(args, cfg) if mode == "generate" else
                         {"step": step_mode, "memory": memory_mode}[mode](args, cfg, memory_runs))
    print("\n   summary (npgpt.fast / torchgpt; targets are upper bounds)")
    for mode in modes:
        r = results[mode]["ratio"]
        print(f"   {mode:9s} {r:6.2f}   target <= {TARGETS[mode]}: {common.verdict(r, TARGETS[mode])}")
    return common.finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
