"""The GPT and the bigram baseline, composed from the layer pairs in npgpt.layers.

Parameters live in one dict keyed by nanoGPT's names (the keys torchgpt's named_parameters()
gives), in nn.Linear layout (out, in). Gradients come back in a dict with the same keys.
npgpt.fast.GPT is the same model on the fast layers (npgpt/fast/), tested equal to this one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .config import GPTConfig
from . import layers as reference_layers
from .layers import REFERENCE, BlockOptions, KVSlot, LayerSet, block_backward, block_forward, norm_backward, norm_forward
from .sampling import sample_next

BLOCK_PARAM_NAMES = (  # one block's parameters, local names, in nanoGPT order
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "attn.q_norm.weight", "attn.k_norm.weight",  # QK-norm only
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in nanoGPT's named_parameters() order.

    The modern switches: no wpe with RoPE; no norm biases with RMSNorm; q_norm and k_norm (hs,)
    with QK-norm; the MLP's hidden width H = config.mlp_hidden_size, c_fc (2H, C) for swiglu.
    """
    V, C, L, H = config.vocab_size, config.n_embd, config.n_layer, config.mlp_hidden_size
    n_fc = 2 * H if config.activation == "swiglu" else H  # swiglu: gate rows, then up rows
    local = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "attn.q_norm.weight": (config.head_size,), "attn.k_norm.weight": (config.head_size,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (n_fc, C), "mlp.c_fc.bias": (n_fc,),
        "mlp.c_proj.weight": (C, H), "mlp.c_proj.bias": (C,),
    }
    norm_bias = config.bias and config.norm == "layernorm"  # RMSNorm has no bias
    absent = set()
    if not config.bias:
        absent |= {name for name in BLOCK_PARAM_NAMES if name.endswith(".bias")}
    if not norm_bias:
        absent |= {"ln_1.bias", "ln_2.bias"}
    if not config.qk_norm:
        absent |= {"attn.q_norm.weight", "attn.k_norm.weight"}
    shapes = {"transformer.wte.weight": (V, C)}
    if config.pos_emb == "learned":  # with RoPE, positions are rotations of q and k instead
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    for i in range(L):
        for name in BLOCK_PARAM_NAMES:
            if name not in absent:
                shapes[f"transformer.h.{i}.{name}"] = local[name]
    shapes["transformer.ln_f.weight"] = (C,)
    if norm_bias:
        shapes["transformer.ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def init_params(config: GPTConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """nanoGPT's initialisation: N(0, 0.02) weights and embeddings, N(0, 0.02/sqrt(2L)) for the
    c_proj weights that write into the residual stream, zero biases, unit norm gains (ln_*, and
    QK-norm's q_norm, k_norm)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            value = np.zeros(shape)
        elif ".ln_" in name or name.endswith("_norm.weight"):
            value = np.ones(shape)
        elif name.endswith("c_proj.weight"):
            value = rng.normal(0.0, 0.02 / math.sqrt(2 * config.n_layer), shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        params[name] = value.astype(dtype)
    return params


def _check_idx(idx, vocab_size: int, max_len: int | None, what: str = "idx") -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what} must be a (B, T) integer array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"{what} holds token ids outside [0, {vocab_size})")
    if max_len is not None and idx.shape[1] > max_len:
        raise ValueError(f"{what} has length {idx.shape[1]} > block_size {max_len}; crop it to the last "
                         f"{max_len} tokens")
    return idx


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_size)
        self.k = np.zeros(shape, dtype=dtype)  # (L, B, nh, block_size, hs)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0  # number of positions filled


class GPTCache(NamedTuple):
    """What GPT.forward keeps for GPT.backward: one cache per layer, in forward order."""
    embedding: reference_layers.EmbeddingCache
    embedding_dropout: reference_layers.DropoutCache | None
    blocks: list  # one BlockCache per block
    ln_f: reference_layers.LayerNormCache | reference_layers.RMSNormCache
    lm_head: reference_layers.LinearCache
    loss: reference_layers.CrossEntropyCache | None  # None when forward had no targets


class GPT:
    """The character-level GPT of the lecture, in nanoGPT's form, with hand-written backprop."""

    layers: LayerSet = REFERENCE  # the pairs it composes; npgpt.fast.GPT hands in npgpt.fast's set

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32):
        self.config = config
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.params = init_params(config, seed, self.dtype)
        self.training = True
        self.rng = np.random.default_rng([seed, 1])  # dropout masks; independent of the init stream
        self.last_dropout_masks: list[np.ndarray] = []
        self._cache: GPTCache | None = None

    # ---------------------------------------------------------------------------------------
    # Bookkeeping
    # ---------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "GPT":
        self.training = mode
        return self

    def eval(self) -> "GPT":
        return self.train(False)

    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def block_params(self, i: int) -> dict[str, np.ndarray]:
        """Block i's parameters under their local names ("ln_1.weight", ...), no copies."""
        prefix = f"transformer.h.{i}."
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def rope(self, T: int, start: int = 0):
        """RoPE's cos and sin (T, hs) for positions start .. start + T - 1, or None (learned wpe)."""
        cfg = self.config
        if cfg.pos_emb != "rope":
            return None
        return reference_layers.rope_angles(T, cfg.head_size, cfg.rope_theta, start, self.dtype)

    def ln_f_forward(self, x: np.ndarray, options: BlockOptions):
        """The final norm: layernorm (bias optional) or RMSNorm, as the config says."""
        P = self.params
        return norm_forward(x, P["transformer.ln_f.weight"], P.get("transformer.ln_f.bias"), options, self.layers)

    @property
    def head_weight(self) -> np.ndarray:
        """The output projection (V, C): wte itself when the weights are tied."""
        key = "transformer.wte.weight" if self.config.tie_weights else "lm_head.weight"
        return self.params[key]

    # ---------------------------------------------------------------------------------------
    # Forward and backward
    # ---------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, dropout_masks: list | None = None):
        """idx (B, T) -> (logits (B, T, V), loss float or None).

        Dropout runs in training mode when config.dropout > 0. Its masks, in the order
        [embedding, then per block: attention probabilities, attention residual, MLP residual],
        are drawn from self.rng or taken from `dropout_masks`; those used are kept in
        self.last_dropout_masks.
        """
        cfg, P = self.config, self.params
        idx = _check_idx(idx, cfg.vocab_size, cfg.block_size)
        use_dropout = self.training and cfg.dropout > 0.0
        if dropout_masks is not None:
            expected = 1 + 3 * cfg.n_layer
            if not use_dropout:
                raise ValueError("dropout_masks given, but dropout is off (eval mode or dropout=0)")
            if len(dropout_masks) != expected:
                raise ValueError(f"dropout_masks has {len(dropout_masks)} masks, expected {expected}")
        masks = [np.asarray(m, dtype=self.dtype) for m in dropout_masks] if dropout_masks else None
        p = cfg.dropout if use_dropout else 0.0
        L = self.layers
        # Drop the previous step's activations now rather than when the new cache replaces them
        # at the end: otherwise both sets are alive at once and the forward's memory peak doubles.
        self._cache = None

        x, c_emb = L.embedding_forward(idx, P["transformer.wte.weight"], P.get("transformer.wpe.weight"))
        rope = self.rope(idx.shape[1])  # None with learned positions
        c_drop = None
        if use_dropout:
            x, c_drop = L.dropout_forward(x, p, self.rng, masks[0] if masks else None)
        options = BlockOptions.of(cfg, p, self.rng, rope)
        c_blocks = []
        for i in range(cfg.n_layer):
            block_masks = masks[1 + 3 * i: 4 + 3 * i] if masks else None
            x, c = block_forward(x, self.block_params(i), options, block_masks, None, L)
            c_blocks.append(c)
        x, c_lnf = self.ln_f_forward(x, options)
        logits, c_head = L.linear_forward(x, self.head_weight)  # (B, T, V)

        self.last_dropout_masks = ([c_drop.mask] + [m for c in c_blocks
                                                    for m in reference_layers.block_dropout_masks(c)]
                                   if use_dropout else [])
        loss, c_loss = None, None
        if targets is not None:
            targets = _check_idx(targets, cfg.vocab_size, None, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} differs from idx shape {idx.shape}")
            loss, c_loss = L.cross_entropy_forward(logits, targets)
            loss = float(loss)
        self._cache = GPTCache(c_emb, c_drop, c_blocks, c_lnf, c_head, c_loss)
        return logits, loss

    def backward(self) -> dict[str, np.ndarray]:
        """Gradients of the last forward's loss w.r.t. every parameter, keyed like self.params.

        Walks the forward in reverse: loss, head, ln_f, blocks from last to first, embedding; the
        tied wte collects dwte + dhead. See docs/gradients.md#model-backward and
        docs/gradients.md#weight-tying.
        """
        cache = self._cache
        if cache is None or cache.loss is None:
            raise RuntimeError("backward() needs a loss: call forward(idx, targets) with targets first")
        L, cfg = self.layers, self.config
        grads = {}

        (dlogits,) = L.cross_entropy_backward(1.0, cache.loss)  # (B, T, V)
        dx, dhead, _ = L.linear_backward(dlogits, cache.lm_head)  # dhead (V, C)
        dx, grads["transformer.ln_f.weight"], db = norm_backward(dx, cache.ln_f, L)
        if db is not None:
            grads["transformer.ln_f.bias"] = db
        for i in reversed(range(cfg.n_layer)):
            dx, block_grads = block_backward(dx, cache.blocks[i])
            for name, g in block_grads.items():
                grads[f"transformer.h.{i}.{name}"] = g
        if cache.embedding_dropout is not None:
            (dx,) = L.dropout_backward(dx, cache.embedding_dropout)
        dwte, dwpe = L.embedding_backward(dx, cache.embedding)
        if dwpe is not None:  # None with RoPE: no wpe
            grads["transformer.wpe.weight"] = dwpe
        if cfg.tie_weights:
            grads["transformer.wte.weight"] = dwte + dhead  # one matrix used twice: the two gradients add
        else:
            grads["transformer.wte.weight"] = dwte
            grads["lm_head.weight"] = dhead
        return {k: grads[k] for k in self.params}  # same keys, same order as params

    __call__ = forward

    # ---------------------------------------------------------------------------------------
    # Inference with a KV cache
    # ---------------------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size, self.dtype)

    def forward_cached(self, idx_new, kv: KVCache) -> np.ndarray:
        """Logits (B, Tn, V) for the tokens idx_new (B, Tn) that follow the kv.length cached ones.

        Each layer appends its new keys and values to the cache and attends over all of them;
        no dropout. Equal to the uncached forward on the whole sequence, position by position.
        """
        cfg, P = self.config, self.params
        idx_new = _check_idx(idx_new, cfg.vocab_size, cfg.block_size, "idx_new")
        start, Tn = kv.length, idx_new.shape[1]
        if start + Tn > cfg.block_size:
            raise ValueError(f"KV cache holds {start} positions; {Tn} more exceed block_size {cfg.block_size}")
        L = self.layers
        # wpe[start:] puts the new tokens at positions start, start + 1, ...; RoPE's angles
        # are those of the same positions (the cached keys were rotated at theirs)
        wpe = P["transformer.wpe.weight"][start:] if "transformer.wpe.weight" in P else None
        x, _ = L.embedding_forward(idx_new, P["transformer.wte.weight"], wpe)
        options = BlockOptions.of(cfg, rope=self.rope(Tn, start))
        for i in range(cfg.n_layer):  # each block stores its new keys and values in its slot
            slot = KVSlot(kv.k[i], kv.v[i], start)
            x, _ = block_forward(x, self.block_params(i), options, None, slot, L)
        kv.length = start + Tn
        x, _ = self.ln_f_forward(x, options)
        logits, _ = L.linear_forward(x, self.head_weight)  # (B, Tn, V)
        return logits

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, use_cache: bool = True, top_p: float | None = None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        The model sees at most the last block_size tokens. With the KV cache each new token costs
        one position's work; once the window is full the positions shift, so the cache is refilled
        from the cropped context. temperature 0 is greedy decoding; top_k, then top_p. No dropout.
        """
        bs = self.config.block_size
        idx = _check_idx(idx, self.config.vocab_size, None)
        if idx.shape[1] == 0:
            raise ValueError("generate needs at least one context token per row")
        idx = idx.astype(np.int64)
        kv = self.new_kv_cache(idx.shape[0])
        logits = self.forward_cached(idx[:, -bs:], kv)
        for step in range(max_new_tokens):
            next_id = sample_next(logits[:, -1], temperature, top_k, rng, top_p)  # (B,)
            idx = np.concatenate([idx, next_id[:, None]], axis=1)
            if step == max_new_tokens - 1:
                break
            if use_cache and kv.length < bs:
                logits = self.forward_cached(next_id[:, None], kv)
            else:  # window full (positions shift) or no cache wanted: recompute the cropped context
                kv.length = 0
                logits = self.forward_cached(idx[:, -bs:], kv)
        return idx


class BigramCache(NamedTuple):
    embedding: reference_layers.EmbeddingCache
    loss: reference_layers.CrossEntropyCache | None  # None when forward had no targets


class BigramLanguageModel:
    """The lecture's baseline: the next token's logits are a row of a (V, V) table."""

    def __init__(self, vocab_size: int, seed: int = 0, dtype=np.float32):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        # N(0, 1) as nn.Embedding's default initialisation
        self.params = {"token_embedding_table.weight": rng.normal(0.0, 1.0, (vocab_size, vocab_size)).astype(dtype)}
        self.training = True
        self._cache = None

    def train(self, mode: bool = True) -> "BigramLanguageModel":
        self.training = mode
        return self

    def eval(self) -> "BigramLanguageModel":
        return self.train(False)

    def num_params(self) -> int:
        return self.vocab_size * self.vocab_size

    def forward(self, idx, targets=None, dropout_masks=None):
        """logits[b, t] = table[idx[b, t]]: (B, T, V); loss the mean cross-entropy or None."""
        idx = _check_idx(idx, self.vocab_size, None)
        L = reference_layers
        logits, c_emb = L.embedding_forward(idx, self.params["token_embedding_table.weight"])
        loss, c_loss = None, None
        if targets is not None:
            targets = _check_idx(targets, self.vocab_size, None, "targets")
            loss, c_loss = L.cross_entropy_forward(logits, targets)
            loss = float(loss)
        self._cache = BigramCache(c_emb, c_loss)
        return logits, loss

    __call__ = forward

    def backward(self) -> dict[str, np.ndarray]:
        """d table = scatter-add of (softmax - onehot) / N into the rows of the input tokens.

        See docs/gradients.md#bigram-model.
        """
        cache = self._cache
        if cache is None or cache.loss is None:
            raise RuntimeError("backward() needs a loss: call forward(idx, targets) with targets first")
        L = reference_layers
        (dlogits,) = L.cross_entropy_backward(1.0, cache.loss)
        dtable, _ = L.embedding_backward(dlogits, cache.embedding)
        return {"token_embedding_table.weight": dtable}

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, use_cache: bool = True, top_p: float | None = None
                 ) -> np.ndarray:
        """Only the last token matters to a bigram model, so no context cropping or cache is needed."""
        idx = _check_idx(idx, self.vocab_size, None).astype(np.int64)
        table = self.params["token_embedding_table.weight"]
        for _ in range(max_new_tokens):
            next_id = sample_next(table[idx[:, -1]], temperature, top_k, rng, top_p)
            idx = np.concatenate([idx, next_id[:, None]], axis=1)
        return idx
