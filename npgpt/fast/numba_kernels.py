"""Fused, threaded kernels for npgpt's fast path, compiled by numba (optional).

Each NumPy layer is a chain of whole-array passes, one thread each: a layernorm reads and writes
its (B, T, C) input five times. A kernel here makes one pass per row (or per head), keeps the
intermediates in registers or in a scratch row that stays in L1, and spreads the rows over the
cores with `prange`. The formulas are those of npgpt.layers; tests/test_numba_kernels.py checks
every kernel against them (float64 within 1e-13 normwise, float32 within 1e-6 of the exact result).

Public functions are npgpt.layers' pairs of the same names, in its order, with its signatures,
conventions and cache types (the reference's NamedTuples, same fields and shapes), so a cache from
a kernel forward goes into a reference backward and back:
    name_forward(inputs...) -> (out, cache)      name_backward(dout, cache) -> grads (a tuple)
npgpt.fast.layers.layer_set puts them into npgpt.fast's layer set when ENABLED (numba available and
the environment variable NPGPT_NUMBA is not "0"); otherwise npgpt.fast runs the reference's pairs.
Without numba (AVAILABLE False: not installed, or failed to load) the module still imports, and
its functions run as plain Python loops: correct, and slow.

Dimension letters as in npgpt.layers: B batch, T time, C channels, nh heads, hs head size,
N rows (B*T), V vocabulary.

Float32 and float64: every kernel compiles once per dtype, on first use. float32 uses a rational
erf and a polynomial exp (below), which vectorise; a scalar libm call per element costs 10-40x
more. float64 calls math.erf and math.exp (libm, within an ulp or two of scipy's), so float64
results stay within 1e-13 of the reference. Sums of a row (means, softmax denominators, the
loss) accumulate in float64 for both dtypes. Parameter gradients (layernorm dw, db) sum one
partial per thread: results are deterministic for a given thread count.

fastmath: the kernels allow contraction into FMAs, reassociation (so sums vectorise), reciprocal
multiplication and signed-zero freedom; not "no NaN"/"no inf" (a NaN loss must stay NaN so the
training loop can stop) and not approximate libm functions (float64's erf and exp stay exact).

Compiled code is cached on disk (numba's cache=True) so a second process loads it in well under
a second; CACHE_DIR says where: NUMBA_CACHE_DIR if set, else the __pycache__ beside this file,
else numba's per-user cache (~/.cache/numba), else a private folder in the temp dir (a read-only
install with a read-only home), else no cache (CACHE_DIR None: each process compiles again).

Threads: numba runs NUMBA_NUM_THREADS threads (default: every core). When that is unset but
OMP_NUM_THREADS is set (as `make test` and the benchmarks do for BLAS), the importing thread
follows OMP_NUM_THREADS, so the kernels keep to the same budget as the matrix products. The pool
starts at import, its idle threads sleeping instead of spinning (_start_threads_that_sleep_when_idle).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import numpy as np

from .. import layers as _reference

try:  # anything wrong with numba (absent, too old for this NumPy, blocked) means: no kernels
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import prange
    from numba.core import types as _nb_types
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload
    from numba.extending import register_jitable
except Exception as _exc:  # noqa: BLE001 - an ImportError, or e.g. numba's NumPy version check
    numba = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"numba could not be imported ({type(_exc).__name__}: {_exc})"
    prange = range
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

# Whether npgpt.fast uses the kernels: NPGPT_NUMBA=0 keeps it on NumPy (to compare, or to rule
# numba out); tests switch it per test.
ENABLED = AVAILABLE and os.environ.get("NPGPT_NUMBA", "1") != "0"

# fastmath flags: see the module docstring for why these and not "fast".
FASTMATH = {"contract", "reassoc", "arcp", "nsz"}


# --------------------------------------------------------------------------------------------
# The on-disk cache and the thread count
# --------------------------------------------------------------------------------------------

def _writable_dir(path: str) -> bool:
    """Whether `path` exists or can be made, and a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _choose_cache_dir() -> str | None:
    """The folder numba will write this module's compiled kernels to (the order numba's own
    cache locators try), setting numba's cache folder to a private temp folder when none of
    numba's choices is writable. None: nowhere to write, compile in every process."""
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR if _writable_dir(numba.config.CACHE_DIR) else None
    in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if _writable_dir(in_tree):
        return in_tree
    from numba.misc.appdirs import AppDirs
    user_wide = AppDirs(appname="numba", appauthor=False).user_cache_dir
    if _writable_dir(user_wide):
        return user_wide
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    private = os.path.join(tempfile.gettempdir(), f"npgpt-numba-cache-{uid}")
    if _writable_dir(private):
        numba.config.CACHE_DIR = private  # numba reads it when each kernel below is decorated
        return private
    return None


def _wanted_threads() -> int | None:
    """OMP_NUM_THREADS when it is set (a whole number >= 1) and NUMBA_NUM_THREADS is not, else None."""
    if "NUMBA_NUM_THREADS" in os.environ:
        return None
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return min(wanted, numba.config.NUMBA_NUM_THREADS) if wanted >= 1 else None


def _follow_omp_num_threads() -> None:
    wanted = _wanted_threads()
    if wanted is not None:
        numba.set_num_threads(wanted)


def _openmp_already_loaded() -> bool:
    """Whether this process has an OpenMP runtime mapped already (torch's libgomp, once torch is
    imported). Linux: /proc/self/maps; elsewhere: whether torch is imported."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line or "libiomp" in line for line in maps)
    except OSError:
        return "torch" in sys.modules


def _start_threads_that_sleep_when_idle() -> None:
    """Start numba's thread pool now, with its idle threads sleeping rather than spinning.

    Why: a training step alternates ~70 short kernels with BLAS calls, and OpenBLAS has its own
    threads. OpenMP's default lets idle threads spin for a while, taking the core that the next
    BLAS call (or any other process) needs; a sleeping thread costs a few microseconds more per
    kernel (bench/RESULTS.md has the measurements). libgomp reads OMP_WAIT_POLICY once, when it
    is loaded: it is set for the moment numba's pool loads it only, so libraries started later
    (torch's own OpenMP) keep their defaults. A policy the user set is left alone.
    When an OpenMP runtime is loaded already (torch imported first), numba's OpenMP pool would join
    it with the policy it read at its own start, spinning. Then the pool is numba's own "workqueue"
    layer instead, whose idle threads sleep, unless NUMBA_THREADING_LAYER says otherwise or the
    kernels run on one thread (OMP_NUM_THREADS=1, as in `make test`): OpenMP runs a one-thread
    kernel inline where workqueue still hands it to its pool, and nothing is left to spin.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    threads_wanted = _wanted_threads() or numba.config.NUMBA_NUM_THREADS
    if "NUMBA_THREADING_LAYER" not in os.environ and threads_wanted > 1 and _openmp_already_loaded():
        numba.config.THREADING_LAYER = "workqueue"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()  # what numba's first parallel call would do
    except Exception:  # noqa: BLE001 - an internal of numba: without it, pools start as numba's defaults say
        pass
    finally:
        del os.environ["OMP_WAIT_POLICY"]


if AVAILABLE:
    CACHE_DIR = _choose_cache_dir()
    _start_threads_that_sleep_when_idle()
    _follow_omp_num_threads()

    def _kernel(function=None, fastmath=FASTMATH):
        def compile_(f):
            return numba.njit(parallel=True, cache=CACHE_DIR is not None, fastmath=fastmath)(f)
        return compile_(function) if function is not None else compile_
else:
    CACHE_DIR = None

    def _kernel(function=None, fastmath=None):  # never run without numba: the reference runs instead
        return function if function is not None else (lambda f: f)


def threads() -> int:
    """How many threads the kernels run on (1 without numba)."""
    return numba.get_num_threads() if AVAILABLE else 1


def set_threads(n: int) -> None:
    """Run the kernels on n threads (at most NUMBA_NUM_THREADS), for this calling thread."""
    if AVAILABLE:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# --------------------------------------------------------------------------------------------
# Scalar math, one version per dtype (numba picks by the argument's type when compiling)
# --------------------------------------------------------------------------------------------
# exp_, erf_, normal_cdf_, normal_pdf_ are called only inside kernels; their Python bodies are the
# float64 versions and say what they mean.

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def exp_(x):
    return math.exp(x)


def erf_(x):
    return math.erf(x)


def normal_cdf_(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * (1.0 + math.erf(x * _INV_SQRT2))


def normal_pdf_(x):
    """pdf(x) = exp(-x^2 / 2) / sqrt(2 pi), the derivative of Phi."""
    return math.exp(-0.5 * x * x) * _INV_SQRT_2PI


def sigmoid_(x):
    """1 / (1 + exp(-x)): 0 for very negative x (exp overflows to inf), never NaN for a number."""
    return 1.0 / (1.0 + math.exp(-x))


# float32 constants (typed float32, so the float32 kernels never widen to float64)
_F32 = np.float32
_HALF32, _ONE32 = _F32(0.5), _F32(1.0)
_INV_SQRT2_32, _INV_SQRT_2PI_32 = _F32(_INV_SQRT2), _F32(_INV_SQRT_2PI)
# erf(x) ~= x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) is 1 in float32): the rational
# approximation of Eigen and XLA (their float32 erf), error below bounds.ERF32_MAX_ERROR.
_ERF32_CLAMP = _F32(4.0)
_ERF32_P = tuple(_F32(c) for c in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))  # x^12 ... x^0
_ERF32_Q = tuple(_F32(c) for c in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02))  # x^8 ... x^0
# exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts,
# the first exact in float32 times any k, so r is exact), exp(r) by its Taylor series to r^7
# (truncation 3e-9 relative, below float32's 6e-8), 2^k built from its exponent bits.
_LOG2E32 = _F32(1.0 / math.log(2.0))
_LN2_HI32, _LN2_LO32 = _F32(0.693359375), _F32(math.log(2.0) - 0.693359375)
_EXP32_MIN, _EXP32_MAX = _F32(-87.33), _F32(88.7)  # 2^k stays a normal float32
_EXP32_TAYLOR = tuple(_F32(1.0 / math.factorial(n)) for n in range(7, -1, -1))  # r^7 ... r^0
_ZERO32 = _F32(0.0)

if AVAILABLE:
    @_intrinsic
    def _float32_from_exponent(typingctx, k):
        """2.0 ** k for an integer k in [-126, 127]: the float32 whose exponent field is k + 127."""
        if not isinstance(k, _nb_types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i32 = _llvm_ir.IntType(32)
            k32 = (builder.trunc(args[0], i32) if k.bitwidth > 32
                   else builder.sext(args[0], i32) if k.bitwidth < 32 else args[0])
            biased = builder.add(k32, _llvm_ir.Constant(i32, 127))
            return builder.bitcast(builder.shl(biased, _llvm_ir.Constant(i32, 23)), _llvm_ir.FloatType())

        return _nb_types.float32(k), codegen

    _scalar = register_jitable(inline="always")  # a Python function that kernels can call, inlined

    @_scalar
    def _exp32(x):
        # NaN passes through (every comparison below is false for it); -inf and very negative
        # arguments give 0; the upper clamp only guards 2^k (exp(88.7) is float32's largest).
        xc = _EXP32_MAX if x > _EXP32_MAX else x
        k = math.floor(xc * _LOG2E32 + _HALF32)
        r = (xc - k * _LN2_HI32) - k * _LN2_LO32
        c = _EXP32_TAYLOR
        p = ((((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]) * r + c[6]) * r + c[7]
        e = p * _float32_from_exponent(np.int32(k))
        return _ZERO32 if x < _EXP32_MIN else e

    @_scalar
    def _erf32(x):
        x = _ERF32_CLAMP if x > _ERF32_CLAMP else x
        x = -_ERF32_CLAMP if x < -_ERF32_CLAMP else x
        x2 = x * x
        a, b = _ERF32_P, _ERF32_Q
        p = (((((a[0] * x2 + a[1]) * x2 + a[2]) * x2 + a[3]) * x2 + a[4]) * x2 + a[5]) * x2 + a[6]
        q = (((b[0] * x2 + b[1]) * x2 + b[2]) * x2 + b[3]) * x2 + b[4]
        return x * p / q

    def _normal_cdf32(x):
        return _HALF32 * (_ONE32 + _erf32(x * _INV_SQRT2_32))

    def _normal_pdf32(x):
        return _exp32(-_HALF32 * x * x) * _INV_SQRT_2PI_32

    def _by_dtype(python_function, float32_version):
        """Compile `python_function` as written for float64, `float32_version` for float32."""
        @_overload(python_function, inline="always")
        def _typed(x):
            if x == _nb_types.float32:
                return float32_version
            if x == _nb_types.float64:
                return python_function
            return None

    _by_dtype(exp_, _exp32)
    _by_dtype(erf_, _erf32)
    _by_dtype(normal_cdf_, _normal_cdf32)
    _by_dtype(normal_pdf_, _normal_pdf32)

    def _sigmoid32(x):
        return _ONE32 / (_ONE32 + _exp32(-x))

    _by_dtype(sigmoid_, _sigmoid32)


# --------------------------------------------------------------------------------------------
# The embedding's backward: a scatter-add of rows
# --------------------------------------------------------------------------------------------

@_kernel
def _embedding_backward_rows(dout, idx, n_parts, dwte):  # dout (N, C), idx (N,), dwte (V, C) zeros
    # Part k owns columns [k C / n_parts, (k + 1) C / n_parts) of every row: no two threads write
    # one element, and each element sums its rows in position order (np.add.at's order).
    n_rows, C = dout.shape
    for k in prange(n_parts):
        c0, c1 = k * C // n_parts, (k + 1) * C // n_parts
        for n in range(n_rows):
            row = idx[n]
            for c in range(c0, c1):
                dwte[row, c] += dout[n, c]


def embedding_backward(dout: np.ndarray, cache):
    """(dwte, dwpe): dwte[v] sums dout's rows at the positions with id v, in position order
    (np.add.at(dwte, idx, dout) bit for bit), with no (B*T, V) one-hot matrix and no product over V;
    dwpe as the reference (None without wpe)."""
    B, T, C = dout.shape
    d2 = np.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    idx = np.ascontiguousarray(cache.idx, dtype=np.int64).reshape(-1)  # (N,), checked by the forward's gather
    dwte = np.zeros(cache.wte_shape, dtype=dout.dtype)  # (V, C): rows no position names stay untouched zeros
    _embedding_backward_rows(d2, idx, max(1, min(threads(), C)), dwte)
    if cache.wpe_shape is None:
        return dwte, None
    dwpe = np.zeros(cache.wpe_shape, dtype=dout.dtype)  # positions >= T got no gradient
    dwpe[:T] = dout.sum(axis=0)  # (T, C)
    return dwte, dwpe


# --------------------------------------------------------------------------------------------
# Layer normalisation over the last axis
# --------------------------------------------------------------------------------------------

@_kernel
def _layernorm_forward_rows(x, w, b, eps, out, xhat, rstd):  # x, out, xhat (N, C); rstd (N,)
    n_rows, C = x.shape
    for n in prange(n_rows):
        total = 0.0
        for c in range(C):
            total += x[n, c]
        mean = total / C
        sq = 0.0
        for c in range(C):
            d = x[n, c] - mean
            sq += d * d
        r = 1.0 / math.sqrt(sq / C + eps)
        rstd[n] = r
        for c in range(C):
            xh = (x[n, c] - mean) * r
            xhat[n, c] = xh
            out[n, c] = xh * w[c] + b[c]


@_kernel
def _layernorm_backward_rows(dout, xhat, rstd, w, dx, dw_parts, db_parts):
    # Rows split into one span per part; part k sums its rows' dw, db terms into dw_parts[k].
    n_rows, C = dout.shape
    n_parts = dw_parts.shape[0]
    for k in prange(n_parts):
        for c in range(C):
            dw_parts[k, c] = 0.0
            db_parts[k, c] = 0.0
        for n in range(k * n_rows // n_parts, (k + 1) * n_rows // n_parts):
            sum_g = 0.0
            sum_gx = 0.0
            for c in range(C):
                g = dout[n, c] * w[c]
                sum_g += g
                sum_gx += g * xhat[n, c]
            mean_g = sum_g / C
            mean_gx = sum_gx / C
            r = rstd[n]
            for c in range(C):
                # in the forward: xhat = (x - mean) * rstd, out = xhat * w + b; so
                # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w
                dx[n, c] = r * (dout[n, c] * w[c] - mean_g - xhat[n, c] * mean_gx)
                dw_parts[k, c] += dout[n, c] * xhat[n, c]
                db_parts[k, c] += dout[n, c]


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                      eps: float = _reference.LAYERNORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b over the last axis, one pass per row."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)  # (N, C)
    out, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    bias = b if b is not None else np.zeros(C, dtype=x.dtype)
    _layernorm_forward_rows(x2, w, bias, float(eps), out, xhat, rstd)
    cache = _reference.LayerNormCache(xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), w, b is not None)
    return out.reshape(x.shape), cache


def layernorm_backward(dout: np.ndarray, cache):
    """(dx, dw, db): dx = rstd (g - mean g - xhat mean(g xhat)), g = dout w; db None without bias."""
    C = dout.shape[-1]
    d2 = np.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    dx = np.empty_like(d2)
    parts = max(1, min(threads(), d2.shape[0]))
    dw_parts, db_parts = np.empty((parts, C)), np.empty((parts, C))  # float64 partial sums
    _layernorm_backward_rows(d2, np.ascontiguousarray(cache.xhat).reshape(-1, C),
                             np.ascontiguousarray(cache.rstd).reshape(-1), cache.w, dx, dw_parts, db_parts)
    dw = dw_parts.sum(axis=0).astype(dout.dtype)
    db = db_parts.sum(axis=0).astype(dout.dtype) if cache.has_bias else None
    return dx.reshape(dout.shape), dw, db


# --------------------------------------------------------------------------------------------
# RMSNorm over the last axis (the modern block's ln_1, ln_2, ln_f and QK-norm)
# --------------------------------------------------------------------------------------------

@_kernel
def _rmsnorm_forward_rows(x, w, eps, out, xhat, rstd):  # x, out, xhat (N, C); rstd (N,)
    n_rows, C = x.shape
    for n in prange(n_rows):
        sq = 0.0
        for c in range(C):
            sq += x[n, c] * x[n, c]
        r = 1.0 / math.sqrt(sq / C + eps)
        rstd[n] = r
        for c in range(C):
            xh = x[n, c] * r
            xhat[n, c] = xh
            out[n, c] = xh * w[c]


@_kernel
def _rmsnorm_backward_rows(dout, xhat, rstd, w, dx, dw_parts):
    # Rows split into one span per part; part k sums its rows' dw terms into dw_parts[k].
    n_rows, C = dout.shape
    n_parts = dw_parts.shape[0]
    for k in prange(n_parts):
        for c in range(C):
            dw_parts[k, c] = 0.0
        for n in range(k * n_rows // n_parts, (k + 1) * n_rows // n_parts):
            sum_gx = 0.0
            for c in range(C):
                sum_gx += dout[n, c] * w[c] * xhat[n, c]
            mean_gx = sum_gx / C
            r = rstd[n]
            for c in range(C):
                # in the forward: xhat = x * rstd, out = xhat * w; so
                # dx = rstd * (g - xhat * mean(g * xhat)), g = dout * w
                dx[n, c] = r * (dout[n, c] * w[c] - xhat[n, c] * mean_gx)
                dw_parts[k, c] += dout[n, c] * xhat[n, c]


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = _reference.RMSNORM_EPS):
    """out = x / sqrt(mean(x^2) + eps) * w over the last axis, one pass per row."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)  # (N, C); a copy for a strided view (QK-norm's heads)
    out, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _rmsnorm_forward_rows(x2, w, float(eps), out, xhat, rstd)
    cache = _reference.RMSNormCache(xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), w)
    return out.reshape(x.shape), cache


def rmsnorm_backward(dout: np.ndarray, cache):
    """(dx, dw): dx = rstd (g - xhat mean(g xhat)), g = dout w; dw = sum of dout xhat over rows."""
    C = dout.shape[-1]
    d2 = np.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
    dx = np.empty_like(d2)
    parts = max(1, min(threads(), d2.shape[0]))
    dw_parts = np.empty((parts, C))  # float64 partial sums
    _rmsnorm_backward_rows(d2, np.ascontiguousarray(cache.xhat).reshape(-1, C),
                           np.ascontiguousarray(cache.rstd).reshape(-1), cache.w, dx, dw_parts)
    return dx.reshape(dout.shape), dw_parts.sum(axis=0).astype(dout.dtype)


# --------------------------------------------------------------------------------------------
# GELU (exact, erf form)
# --------------------------------------------------------------------------------------------

@_kernel(fastmath=FASTMATH - {"reassoc"})  # out = x * phi exactly: the block rebuilds out from the cache
def _gelu_forward_flat(x, out, phi):  # (n,)
    for i in prange(x.shape[0]):
        cdf = normal_cdf_(x[i])
        phi[i] = cdf
        out[i] = x[i] * cdf


@_kernel
def _gelu_backward_flat(dout, x, phi, dx):  # (n,)
    for i in prange(x.shape[0]):
        # in the forward: out = x Phi(x); so dx = dout (Phi(x) + x pdf(x))
        dx[i] = dout[i] * (phi[i] + x[i] * normal_pdf_(x[i]))


def gelu_forward(x: np.ndarray):
    """out = x Phi(x) (nn.GELU()) in one pass; the cache is the reference's (x, Phi(x))."""
    x = np.ascontiguousarray(x)
    out, phi = np.empty_like(x), np.empty_like(x)
    _gelu_forward_flat(x.reshape(-1), out.reshape(-1), phi.reshape(-1))
    return out, _reference.GeluCache(x, phi)


def gelu_backward(dout: np.ndarray, cache):
    """(dx,): dx = dout * (Phi(x) + x pdf(x)), one pass."""
    x, phi = np.ascontiguousarray(cache.x), np.ascontiguousarray(cache.phi)
    dx = np.empty_like(x)
    _gelu_backward_flat(np.ascontiguousarray(dout).reshape(-1), x.reshape(-1), phi.reshape(-1), dx.reshape(-1))
    return (dx,)


# --------------------------------------------------------------------------------------------
# SwiGLU and RoPE (the modern block)
# --------------------------------------------------------------------------------------------

# out = (gate * sig) * up exactly as stored, since the block rebuilds out from the cache: no
# reassociation, and no reciprocal rewriting (arcp would turn gate * (1 / d) * up into gate / d * up)
@_kernel(fastmath=FASTMATH - {"reassoc", "arcp"})
def _swiglu_forward_rows(x, out, sig):  # x (N, 2H) C-contiguous (so the row loop vectorises); out, sig (N, H)
    n_rows, H = out.shape
    for n in prange(n_rows):
        for h in range(H):
            g = x[n, h]
            sig[n, h] = sigmoid_(g)
            s = sig[n, h]  # read back in the array's dtype (float32's exp works partly in float64)
            out[n, h] = g * s * x[n, H + h]


@_kernel
def _swiglu_backward_rows(dout, gate, up, sig, dgate, dup):  # all (N, H); dgate, dup views of dx (N, 2H)
    n_rows, H = dout.shape
    for n in prange(n_rows):
        for h in range(H):
            g, s, d = gate[n, h], sig[n, h], dout[n, h]
            # out = g sigmoid(g) up: d out / d g = up sigmoid(g) (1 + g (1 - sigmoid(g))), d out / d up = g sigmoid(g)
            dgate[n, h] = d * up[n, h] * (s * (1.0 + g * (1.0 - s)))
            dup[n, h] = d * g * s


def _rows(a: np.ndarray) -> np.ndarray:
    """a (..., K) as (N, K): a view where the leading axes merge (halves of a contiguous array do)."""
    return a.reshape(-1, a.shape[-1])


def swiglu_forward(x: np.ndarray):
    """out = silu(gate) * up, gate, up = x[..., :H], x[..., H:], in one pass; the reference's cache."""
    x = np.ascontiguousarray(x)
    H = x.shape[-1] // 2
    gate, up = x[..., :H], x[..., H:]  # views, as the reference's cache holds them
    out = np.empty(x.shape[:-1] + (H,), dtype=x.dtype)
    sig = np.empty_like(out)
    _swiglu_forward_rows(_rows(x), _rows(out), _rows(sig))
    return out, _reference.SwigluCache(gate, up, sig)


def swiglu_backward(dout: np.ndarray, cache):
    """(dx,): dgate = dout up silu'(gate), dup = dout silu(gate), written into the halves of dx."""
    gate, up, sig = cache
    H = gate.shape[-1]
    dx = np.empty(dout.shape[:-1] + (2 * H,), dtype=dout.dtype)
    _swiglu_backward_rows(_rows(np.ascontiguousarray(dout)), _rows(gate), _rows(up), _rows(sig),
                          _rows(dx[..., :H]), _rows(dx[..., H:]))
    return (dx,)


@_kernel(fastmath=False)  # no contraction into FMAs: bit for bit the reference's x * cos + rotate_half(x) * sin
def _rope_heads(x, cos, sin, sign, out):  # x, out (B, nh, T, hs), any strides; cos, sin (T, hs); sign +-1
    B, nh, T, hs = x.shape
    half = hs // 2
    for bh in prange(B * nh):
        b, h = bh // nh, bh % nh
        for t in range(T):
            for i in range(half):
                x1, x2 = x[b, h, t, i], x[b, h, t, half + i]
                # forward (sign +1): (x1 cos - x2 sin, x2 cos + x1 sin); backward (sign -1): the rotation by -angle
                out[b, h, t, i] = x1 * cos[t, i] - sign * (x2 * sin[t, i])
                out[b, h, t, half + i] = x2 * cos[t, half + i] + sign * (x1 * sin[t, half + i])


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """npgpt.layers.rope_forward: out = x * cos + rotate_half(x) * sin, x (B, nh, T, hs) of any
    strides (heads of qkv), in one pass; bit for bit the reference's. The cache is the reference's."""
    out = np.empty(x.shape, dtype=x.dtype)
    _rope_heads(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), x.dtype.type(1.0), out)
    return out, _reference.RopeCache(cos, sin)


def rope_backward(dout: np.ndarray, cache):
    """(dx,): dx = dout * cos - rotate_half(dout) * sin, the rotation by -angle, in one pass."""
    dx = np.empty(dout.shape, dtype=dout.dtype)
    _rope_heads(dout, np.ascontiguousarray(cache.cos), np.ascontiguousarray(cache.sin), dout.dtype.type(-1.0), dx)
    return (dx,)


# --------------------------------------------------------------------------------------------
# Softmax over the last axis (rows of any length)
# --------------------------------------------------------------------------------------------

@_kernel
def _softmax_forward_rows(x, y):  # (N, K)
    n_rows, K = x.shape
    for n in prange(n_rows):
        top = x[n, 0]
        for j in range(1, K):
            top = x[n, j] if x[n, j] > top else top
        total = 0.0
        for j in range(K):
            e = exp_(x[n, j] - top)
            y[n, j] = e
            total += e
        inv = 1.0 / total
        for j in range(K):
            y[n, j] = y[n, j] * inv


@_kernel
def _softmax_backward_rows(dout, y, dx):  # (N, K)
    n_rows, K = y.shape
    for n in prange(n_rows):
        dot = 0.0
        for j in range(K):
            dot += dout[n, j] * y[n, j]
        for j in range(K):
            dx[n, j] = y[n, j] * (dout[n, j] - dot)


def softmax_forward(x: np.ndarray):
    """out = exp(x - max x) / sum exp(x - max x) over the last axis."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = np.empty_like(x2)
    _softmax_forward_rows(x2, y)
    y = y.reshape(x.shape)
    return y, _reference.SoftmaxCache(y)


def softmax_backward(dout: np.ndarray, cache):
    """(dx,): dx = y * (dout - sum(dout * y))."""
    y = np.ascontiguousarray(cache.y)
    K = y.shape[-1]
    dx = np.empty_like(y)
    _softmax_backward_rows(np.ascontiguousarray(dout).reshape(-1, K), y.reshape(-1, K), dx.reshape(-1, K))
    return (dx,)


# --------------------------------------------------------------------------------------------
# Causal self-attention, one (batch, head) pair per task
# --------------------------------------------------------------------------------------------
# q, k, v are the reference's head views (B, nh, T, hs) of qkv (B, T, 3C). One task per (batch,
# head) copies its head into contiguous scratch, multiplies with BLAS (numba's np.dot: faster
# than hand-written loops over so short a head size), and runs the scale, the causal mask
# and the softmax over its (T, T) scores while they sit in L1/L2. Query i sees keys
# 0..i: the softmax runs over j <= i only and writes exact zeros above the diagonal.

@_kernel
def _attention_forward_heads(q, k, v, scale, use_mask, mask, att, y):
    # q, k, v (B, nh, T, hs) views; mask, att (B, nh, T, T); y (B, nh, T, hs) view of (B, T, C)
    B, n_head, T, hs = q.shape
    for task in prange(B * n_head):
        b, h = task // n_head, task % n_head
        # this head's q and v (T, hs) and k transposed (hs, T), contiguous, for BLAS; plain copy
        # loops (np.ascontiguousarray on these strided views compiles to slower code)
        qh, kt, vh = np.empty((T, hs), q.dtype), np.empty((hs, T), q.dtype), np.empty((T, hs), q.dtype)
        for t in range(T):
            for d in range(hs):
                qh[t, d] = q[b, h, t, d]
                kt[d, t] = k[b, h, t, d]
                vh[t, d] = v[b, h, t, d]
        scores = np.dot(qh, kt)  # (T, T), unscaled: softmax(scale s) = exp(scale (s - max s)) / sum
        used = np.empty((T, T), q.dtype)  # att, or att * mask with dropout
        for i in range(T):
            top = scores[i, 0]
            for j in range(1, i + 1):
                top = scores[i, j] if scores[i, j] > top else top
            total = 0.0
            for j in range(i + 1):
                e = exp_((scores[i, j] - top) * scale)
                att[b, h, i, j] = e
                total += e
            inv = 1.0 / total
            for j in range(i + 1):
                pij = att[b, h, i, j] * inv
                att[b, h, i, j] = pij
                used[i, j] = pij * mask[b, h, i, j] if use_mask else pij
            for j in range(i + 1, T):
                att[b, h, i, j] = 0.0
                used[i, j] = 0.0
        out = np.dot(used, vh)  # (T, T) @ (T, hs)
        for t in range(T):
            for d in range(hs):
                y[b, h, t, d] = out[t, d]


@_kernel
def _attention_backward_heads(dy, q, k, v, att, scale, use_mask, mask, dq, dk, dv):
    # dy, q, k, v, dq, dk, dv (B, nh, T, hs) views; att, mask (B, nh, T, T)
    B, n_head, T, hs = q.shape
    for task in prange(B * n_head):
        b, h = task // n_head, task % n_head
        qh, kh, vt = np.empty((T, hs), q.dtype), np.empty((T, hs), q.dtype), np.empty((hs, T), q.dtype)
        dyh = np.empty((T, hs), q.dtype)
        for t in range(T):
            for d in range(hs):
                qh[t, d] = q[b, h, t, d]
                kh[t, d] = k[b, h, t, d]
                vt[d, t] = v[b, h, t, d]
                dyh[t, d] = dy[b, h, t, d]
        # in the forward: y = att_used v, att_used = att * mask (or att); so
        # dv = att_used^T dy, datt_used = dy v^T, datt = datt_used * mask
        used = np.empty((T, T), q.dtype)  # att_used
        for i in range(T):
            for j in range(T):
                used[i, j] = att[b, h, i, j] * mask[b, h, i, j] if use_mask else att[b, h, i, j]
        dvh = np.dot(used.T, dyh)  # (T, hs)
        ds = np.dot(dyh, vt)  # (T, T) datt_used, turned into d(scores) in place below
        for i in range(T):
            if use_mask:
                for j in range(i + 1):
                    ds[i, j] = ds[i, j] * mask[b, h, i, j]
            # softmax backward: dz = att * (datt - sum_j datt * att); z = scale * scores
            dot = 0.0
            for j in range(i + 1):
                dot += ds[i, j] * att[b, h, i, j]
            for j in range(i + 1):
                ds[i, j] = att[b, h, i, j] * (ds[i, j] - dot) * scale
            for j in range(i + 1, T):
                ds[i, j] = 0.0
        dqh = np.dot(ds, kh)  # scores = q k^T: dq = ds k, dk = ds^T q
        dkh = np.dot(ds.T, qh)
        for t in range(T):
            for d in range(hs):
                dq[b, h, t, d] = dqh[t, d]
                dk[b, h, t, d] = dkh[t, d]
                dv[b, h, t, d] = dvh[t, d]


def new_heads_buffer(B: int, n_head: int, T: int, hs: int, parts: int, dtype) -> tuple:
    """`parts` arrays (B, nh, T, hs), head views of one fresh (B, T, parts * C) array: merge_heads
    of one is a view of its channels, and npgpt.fast's merge_qkv of three is the array itself."""
    C = n_head * hs
    buffer = np.empty((B, T, parts * C), dtype=dtype)
    return tuple(_reference.split_heads(buffer[..., i * C:(i + 1) * C], n_head) for i in range(parts))


def causal_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dropout_p: float = 0.0,
                             rng: np.random.Generator | None = None, mask: np.ndarray | None = None):
    """npgpt.layers.causal_attention_forward, one task per (batch, head): q, k, v (B, nh, T, hs)
    of any strides (views of qkv) -> y (B, nh, T, hs), a head view of a fresh (B, T, C) array.

    Queries and keys cover the same T positions (no KV cache). Dropout runs when dropout_p > 0 or
    a mask (B, nh, T, T) is given; the mask is drawn from `rng` otherwise (the reference's draw).
    The cache is the reference's AttentionCache.
    """
    B, n_head, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    if mask is None and dropout_p > 0.0:
        if rng is None:
            raise ValueError("causal_attention_forward needs either rng or mask for dropout")
        mask = _reference.dropout_mask((B, n_head, T, T), dropout_p, rng, q.dtype)
    use_mask = mask is not None
    mask_arg = np.ascontiguousarray(mask, dtype=q.dtype) if use_mask else np.ones((1, 1, 1, 1), q.dtype)
    att = np.empty((B, n_head, T, T), dtype=q.dtype)
    (y,) = new_heads_buffer(B, n_head, T, hs, 1, q.dtype)
    _attention_forward_heads(q, k, v, q.dtype.type(scale), use_mask, mask_arg, att, y)
    return y, _reference.AttentionCache(q, k, v, att, mask_arg if use_mask else None, scale)


def causal_attention_backward(dout: np.ndarray, cache):
    """npgpt.layers.causal_attention_backward: (dq, dk, dv), each (B, nh, T, hs), head views of
    one fresh (B, T, 3C) array (new_heads_buffer)."""
    q = cache.q
    use_mask = cache.att_mask is not None
    mask_arg = cache.att_mask if use_mask else np.ones((1, 1, 1, 1), q.dtype)
    dq, dk, dv = new_heads_buffer(*q.shape, 3, dout.dtype)
    _attention_backward_heads(dout, q, cache.k, cache.v, np.ascontiguousarray(cache.att),
                              q.dtype.type(cache.scale), use_mask, np.ascontiguousarray(mask_arg), dq, dk, dv)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Cross-entropy fused with softmax, mean over positions
# --------------------------------------------------------------------------------------------

@_kernel
def _cross_entropy_rows(logits, targets, probs, losses):  # (N, V), (N,), (N, V), (N,) float64
    n_rows, V = logits.shape
    for n in prange(n_rows):
        top = logits[n, 0]
        for v in range(1, V):
            top = logits[n, v] if logits[n, v] > top else top
        total = 0.0
        for v in range(V):
            e = exp_(logits[n, v] - top)
            probs[n, v] = e
            total += e
        losses[n] = top + math.log(total) - logits[n, targets[n]]  # log_z - logit of the target
        inv = 1.0 / total
        for v in range(V):
            probs[n, v] = probs[n, v] * inv


@_kernel
def _cross_entropy_backward_rows(probs, targets, coef, dlogits):  # (N, V), (N,), scalar, (N, V)
    n_rows, V = probs.shape
    for n in prange(n_rows):
        for v in range(V):
            dlogits[n, v] = probs[n, v] * coef
        dlogits[n, targets[n]] -= coef


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """loss = mean over positions of -log softmax(logits)[target], one pass over the logits.
    The loss is summed in float64; the cache is the reference's (softmax, targets, shape)."""
    V = logits.shape[-1]
    flat = np.ascontiguousarray(logits).reshape(-1, V)  # (N, V)
    t = np.asarray(targets).reshape(-1)  # (N,)
    if t.shape[0] != flat.shape[0]:
        raise ValueError(f"cross_entropy_forward: {t.shape[0]} targets for {flat.shape[0]} rows of logits")
    if t.size and (t.min() < 0 or t.max() >= V):
        raise IndexError(f"cross_entropy_forward: a target lies outside [0, {V}) (min {t.min()}, max {t.max()})")
    probs = np.empty_like(flat)
    losses = np.empty(flat.shape[0], dtype=np.float64)
    _cross_entropy_rows(flat, np.ascontiguousarray(t, dtype=np.int64), probs, losses)
    loss = logits.dtype.type(losses.sum() / max(1, flat.shape[0]))
    return loss, _reference.CrossEntropyCache(probs, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """(dlogits,): dlogits = (softmax(logits) - onehot(target)) / N * dloss."""
    probs = np.ascontiguousarray(cache.probs)
    dlogits = np.empty_like(probs)
    coef = probs.dtype.type(dloss / probs.shape[0])
    _cross_entropy_backward_rows(probs, np.ascontiguousarray(cache.targets, dtype=np.int64), coef, dlogits)
    return (dlogits.reshape(cache.logits_shape),)


# --------------------------------------------------------------------------------------------
# AdamW over one flat buffer, and the gradient norm for clipping
# --------------------------------------------------------------------------------------------

@_kernel
def _adamw_flat(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                bias_correction2_sqrt):
    # decay = 1 - lr wd, step_size = lr / (1 - beta1^t): the formulas of npgpt.optim.AdamW
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / bias_correction2_sqrt + eps))


@_kernel
def _sum_of_squares(a):  # (n,) -> float64
    total = 0.0
    for i in prange(a.shape[0]):
        ai = np.float64(a[i])  # squares of float32 entries are exact in float64
        total += ai * ai
    return total


@_kernel
def _scale_in_place(a, factor):  # (n,)
    for i in prange(a.shape[0]):
        a[i] = a[i] * factor


def adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """torch's AdamW step over flat, contiguous, same-dtype 1-D buffers, in place (p, m, v):

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)        (t = step >= 1)
    """
    if not (p.ndim == g.ndim == m.ndim == v.ndim == 1 and p.shape == g.shape == m.shape == v.shape):
        raise ValueError("adamw_update takes four 1-D buffers of one length")
    if not all(a.flags.c_contiguous and a.dtype == p.dtype for a in (g, m, v)):
        raise ValueError("adamw_update: g, m and v must be contiguous and of p's dtype")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    s = p.dtype.type  # scalars in the buffers' dtype, so float32 stays float32 (as torch)
    _adamw_flat(p, g, m, v, s(beta1), s(1.0 - beta1), s(beta2), s(1.0 - beta2), s(eps),
                s(1.0 - lr * weight_decay), s(lr / bias_correction1), s(bias_correction2_sqrt))


def sum_of_squares(a: np.ndarray) -> float:
    """sum(a^2) over a contiguous buffer, accumulated in float64 (for the global gradient norm)."""
    return float(_sum_of_squares(np.ascontiguousarray(a).reshape(-1)))


def scale_in_place(a: np.ndarray, factor: float) -> None:
    """a *= factor for a contiguous buffer (gradient clipping)."""
    if not a.flags.c_contiguous:
        a *= a.dtype.type(factor)
        return
    _scale_in_place(a.reshape(-1), a.dtype.type(factor))
