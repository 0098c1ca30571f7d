"""Helpers of the fast path's tests (tests/test_fastpath.py, tests/test_numba_kernels.py): npgpt.fast
against the reference through npgpt.compare, with the arrays of a result or cache keyed by their
path; the small models they run and the float64 twin that gives a float32 run's exact result."""
from __future__ import annotations

import numpy as np

import npgpt
from npgpt import GPTConfig, fast
from npgpt.bounds import bitwise
from npgpt.compare import compare_all, error_rows, format_table, rel_error
from npgpt.model import init_params

IN_PLACE = bitwise("npgpt.fast's NumPy code runs the reference's elementwise operations and reductions "
                   "in the reference's order, writing in place or with out=")


def arrays_of(prefix: str, obj) -> dict:
    """Every array in a result or cache (NamedTuples, tuples, lists, dicts), keyed by its path.
    None fields are skipped (the fast block drops its MLP activation; compared separately)."""
    if isinstance(obj, np.ndarray) or np.isscalar(obj) and not isinstance(obj, (str, bool)):
        return {prefix: np.asarray(obj)}
    out = {}
    if hasattr(obj, "_fields"):
        items = zip(obj._fields, obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    else:
        return out
    for key, value in items:
        out.update(arrays_of(f"{prefix}.{key}", value))
    return out


def check_equal(header: str, ours: dict, theirs: dict, rtol) -> list:
    """npgpt.compare's table for every array, rtol from npgpt.bounds (0: bit for bit); prints the
    worst error / bound ratio of a bound above 0."""
    rows = compare_all(ours, theirs, rtol=rtol, header=header)
    ratios = [r.rel / r.rtol for r in rows if r.rtol]
    if ratios:
        print(f"{header}: worst error / bound {max(ratios):.3g}")
    return rows


def run_pair(forward, backward, args, kwargs, rng, dtype):
    out, cache = forward(*args, **kwargs)
    dout = rng.standard_normal(np.shape(out)).astype(dtype)
    return out, cache, backward(dout, cache)


def compare_pair(name, fast_pair, ref_pair, args, dtype, rtol, **kwargs):
    """Forward output, cache and backward of a fast pair and its reference on the same inputs,
    within rtol (a bound from npgpt.bounds)."""
    f_out, f_cache, f_grads = run_pair(*fast_pair, args, kwargs, np.random.default_rng(99), dtype)
    r_out, r_cache, r_grads = run_pair(*ref_pair, args, kwargs, np.random.default_rng(99), dtype)
    assert type(f_cache) is type(r_cache), f"{name}: cache types differ"
    ours = {**arrays_of("out", f_out), **arrays_of("cache", f_cache), **arrays_of("grad", f_grads)}
    theirs = {**arrays_of("out", r_out), **arrays_of("cache", r_cache), **arrays_of("grad", r_grads)}
    check_equal(f"{name} [{np.dtype(dtype).name}]", ours, theirs, rtol)


def randn(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def block_params(config: GPTConfig, dtype) -> dict:
    p = init_params(config, 1, dtype)
    rng = np.random.default_rng(9)
    return {k[len("transformer.h.0."):]: v + randn(rng, v.shape, dtype, 0.2)
            for k, v in p.items() if k.startswith("transformer.h.0.")}


def small_config(**kw):
    return GPTConfig(**{**dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, tie_weights=False,
                              bias=True), **kw})


def batch(config, B=3, seed=14):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.vocab_size, (B, config.block_size)),
            rng.integers(0, config.vocab_size, (B, config.block_size)))


def noisy_pair(config, dtype, seed=2):
    """A reference and a fast GPT with the same (noisy, so biases matter) parameters."""
    reference = npgpt.GPT(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(15)
    for p in reference.params.values():
        p += randn(rng, p.shape, dtype, 0.2)
    quick = fast.GPT(config, seed=seed, dtype=dtype)
    for n, p in reference.params.items():
        quick.params[n][...] = p
    return reference, quick


def check(name, ours, exact, dtype, bound, reference32=None):
    """ours (in `dtype`) within `bound` (from npgpt.bounds) of `exact` (float64), normwise, through
    npgpt.compare's row; prints it with the worst error / bound ratio (and the float32 reference's
    error for scale)."""
    assert np.asarray(ours).dtype == np.dtype(dtype), f"{name}: dtype {np.asarray(ours).dtype}, expected {np.dtype(dtype)}"
    (row,) = error_rows({name: ours}, {name: exact}, rtol=bound)
    extra = f"; float32 reference {rel_error(reference32, exact):.2e}" if reference32 is not None else ""
    ratio = row.rel / bound if bound else float(row.rel > 0) * float("inf")
    print(f"{format_table([row], f'{name} [{np.dtype(dtype).name}]')}  (worst error / bound {ratio:.3g}){extra}")
    assert row.ok, f"{name}: {row.describe()}"


def compare_to_reference(header, ours: dict, reference: dict, exact: dict | None, dtype, bound: float) -> None:
    """float64: ours within `bound` (bounds.fast_model) of the reference. float32: ours and the
    float32 reference are both compared with the exact result (the reference in float64 on the same
    float32 inputs), ours within `bound` of it (the kernels sum in another order than the
    reference, so neither float32 result is the other's truth); the reference's error is printed
    beside it for scale."""
    if np.dtype(dtype) == np.float64:
        rows = compare_all(ours, reference, rtol=bound, header=header)
        print(f"{header}: worst error / bound {max(r.rel / r.rtol for r in rows):.3g}")
        return
    print(f"\n{header}: normwise error against the exact result, ours / float32 reference")
    bad, worst = [], 0.0
    for name in exact:
        mine, theirs = rel_error(ours[name], exact[name]), rel_error(reference[name], exact[name])
        worst = max(worst, mine / bound)
        print(f"  {name:36s} {mine:.2e} / {theirs:.2e}  (bound {bound:.1e}){'  FAIL' if not mine <= bound else ''}")
        if not mine <= bound:
            bad.append(name)
    print(f"{header}: worst error / bound {worst:.3g}")
    assert not bad, f"{header}: further from the exact result than allowed: {bad}"


def exact_twin(model, config):
    """A float64 reference GPT holding `model`'s (float32) parameters exactly."""
    twin = npgpt.GPT(config, dtype=np.float64)
    for n, p in model.params.items():
        twin.params[n][...] = p
    return twin


MODERN = dict(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="swiglu", bias=False, rope_theta=100.0)
MODERN_CONFIGS = {  # the modern block's switches, one config each
    "modern": small_config(**MODERN),
    "modern-relu2-bias-eps": small_config(norm="rmsnorm", pos_emb="rope", qk_norm=True, activation="relu2",
                                          norm_eps=0.01),
    "rope-only": small_config(pos_emb="rope"),
    "qk_norm-layernorm": small_config(qk_norm=True, norm_eps=1e-3),
    "swiglu-H12-tied": small_config(activation="swiglu", mlp_hidden=12, tie_weights=True),
}
MODEL_CONFIGS = {  # the model tables of tests/test_fastpath.py and tests/test_numba_kernels.py
    "untied-bias-gelu": small_config(),
    "tied-nobias-relu": small_config(tie_weights=True, bias=False, activation="relu"),
    "dropout-gelu_tanh": small_config(dropout=0.2, activation="gelu_tanh"),
    **MODERN_CONFIGS,
}
