"""The character-level GPT in PyTorch: nanoGPT's modules, the reference for npgpt.

Dimension letters as in npgpt/layers.py: B batch, T time, C channels (n_embd), nh heads,
hs head size (C // nh), V vocabulary.

Two attention paths live side by side: "sdpa" (F.scaled_dot_product_attention, the fast one) and
"explicit" (masked softmax written out, the one npgpt mirrors). Dropout can take its masks from the
caller, so that a training step can be replayed exactly in npgpt.

The modern block's switches (GPTConfig.norm, pos_emb, qk_norm, activation "relu2"/"swiglu",
mlp_hidden) are built from torch's own pieces: F.rms_norm, F.silu, and RoPE's rotate-half formula.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from npgpt.config import GPTConfig
from npgpt.sampling import sample_next

ATTENTIONS = ("sdpa", "explicit")


# --------------------------------------------------------------------------------------------
# Dropout: drawn by F.dropout, drawn and recorded, or given by the caller
# --------------------------------------------------------------------------------------------

class DropoutPlan:
    """The dropout of one forward pass, shared by all its sites in the order they run.

    A mask holds keep / (1 - p) and dropout is `x * mask`. Masks come from `masks` (already
    checked), or are drawn here (and kept in `used`) when `record`; otherwise F.dropout draws.
    """

    def __init__(self, p: float, masks: list | None = None, record: bool = False):
        self.p = p  # 0.0 means no dropout at all (eval mode or dropout=0)
        self.given = iter(masks) if masks is not None else None
        self.record = record
        self.used = [] if (masks is not None or record or p == 0.0) else None

    @property
    def uses_masks(self) -> bool:
        """True when every site needs an explicit mask (so SDPA's internal dropout can't be used)."""
        return self.p > 0.0 and (self.given is not None or self.record)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if self.given is not None:
            mask = next(self.given)
        elif self.record:
            mask = (torch.rand_like(x) >= self.p).to(x.dtype) / (1.0 - self.p)
        else:
            return F.dropout(x, self.p, training=True)
        self.used.append(mask)
        return x * mask


NO_DROPOUT = DropoutPlan(0.0)


# --------------------------------------------------------------------------------------------
# KV cache for generation
# --------------------------------------------------------------------------------------------

class LayerKV:
    """Keys and values one attention layer has seen so far, each (B, nh, T_past, hs) or None."""

    def __init__(self):
        self.k = None
        self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add the new positions' k, v (B, nh, T_new, hs); return all of them (B, nh, T_all, hs)."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """One LayerKV per block; len() is the number of positions cached."""

    def __init__(self, n_layer: int):
        self.layers = [LayerKV() for _ in range(n_layer)]

    def __len__(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.size(2)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm can't drop just the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis: F.rms_norm, or its formula on a torch
    that predates it (2.4)."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, weight.shape, weight, eps)
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    """RMSNorm with a gain and no bias: y = x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, ndim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: GPTConfig, ndim: int) -> nn.Module:
    """ln_1, ln_2, ln_f: LayerNorm (bias as config.bias) or RMSNorm (never a bias)."""
    if config.norm == "rmsnorm":
        return RMSNorm(ndim, config.norm_eps)
    return LayerNorm(ndim, bias=config.bias, eps=config.norm_eps)


def rope_cos_sin(T: int, head_size: int, theta: float, offset: int, dtype, device):
    """cos, sin (T, hs) of RoPE's angles for positions offset .. offset + T - 1.

    inv_freq[i] = theta ** (-2i / hs), angle[t] = t * inv_freq duplicated to hs (HF Llama's
    rotate-half layout). Computed in float64, then cast, as npgpt.layers.rope_angles does.
    """
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64, device=device) / head_size)
    positions = torch.arange(offset, offset + T, dtype=torch.float64, device=device)  # (T,)
    angle = torch.outer(positions, inv_freq)  # (T, hs/2)
    angle = torch.cat((angle, angle), dim=-1)  # (T, hs)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x[..., hs/2:], x[..., :hs/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated pairwise by the angles whose cos and sin (T, hs) are given."""
    return x * cos + rotate_half(x) * sin


def causal_keep(T_query: int, T_key: int, device) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may see key j; queries are the last Tq positions."""
    return torch.ones(T_query, T_key, dtype=torch.bool, device=device).tril(T_key - T_query)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attention = attention
        if config.qk_norm:  # RMSNorm over hs, the same gain for every head (Qwen3)
            self.q_norm = RMSNorm(config.head_size, config.norm_eps)
            self.k_norm = RMSNorm(config.head_size, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, drop: DropoutPlan, kv: LayerKV | None = None, rope=None):
        """x (B, T, C) -> (B, T, C); with `kv`, x holds the newest positions after those cached.

        rope: None (learned positions) or (cos, sin), each (T, hs), for x's positions.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:  # after the head split, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # cached keys were rotated when they were new
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, nh, Tk, hs), Tk = T_past + T
        Tk = k.size(2)
        if self.attention == "sdpa" and not drop.uses_masks:
            if Tk == T:  # is_causal aligns queries to the first keys, right only when Tq == Tk
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop.p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_keep(T, Tk, x.device))
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, Tk)
            att = att.masked_fill(~causal_keep(T, Tk, x.device), float("-inf"))
            att = F.softmax(att, dim=-1)
            att = drop(att)
            y = att @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return drop(self.c_proj(y))


class MLP(nn.Module):
    """c_fc -> activation -> c_proj, hidden width H = config.mlp_hidden_size (4C by default).

    With swiglu, c_fc is (2H, C): rows [0, H) the gate, rows [H, 2H) the up projection.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        H = config.mlp_hidden_size
        n_fc = 2 * H if config.activation == "swiglu" else H
        self.c_fc = nn.Linear(config.n_embd, n_fc, bias=config.bias)
        self.c_proj = nn.Linear(H, config.n_embd, bias=config.bias)
        self.activation = config.activation

    def forward(self, x, drop: DropoutPlan):
        x = self.c_fc(x)  # (B, T, H), (B, T, 2H) for swiglu
        if self.activation == "relu":
            x = F.relu(x)
        elif self.activation == "gelu":
            x = F.gelu(x)
        elif self.activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif self.activation == "relu2":
            x = F.relu(x).square()
        else:  # swiglu
            gate, up = x.chunk(2, dim=-1)  # 2 x (B, T, H)
            x = F.silu(gate) * up
        return drop(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):

    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, drop: DropoutPlan, kv: LayerKV | None = None, rope=None):
        x = x + self.attn(self.ln_1(x), drop, kv, rope)
        x = x + self.mlp(self.ln_2(x), drop)
        return x


# --------------------------------------------------------------------------------------------
# The GPT
# --------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """nanoGPT's GPT. attention="sdpa" (fast) or "explicit" (written out, as npgpt computes it).

    record_dropout_masks: when True, dropout draws its masks itself and keeps them in
    `last_dropout_masks` (slower: attention then takes the explicit path in training).
    """

    def __init__(self, config: GPTConfig, attention: str = "sdpa", record_dropout_masks: bool = False):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
        self.config = config
        self.record_dropout_masks = record_dropout_masks
        self.last_dropout_masks: list | None = None
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":  # with rope, positions live in the rotation of q and k
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["h"] = nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)])
        modules["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        # Tied: the head is transformer.wte.weight itself, so no lm_head module is registered.
        self.lm_head = None if config.tie_weights else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()

    @property
    def attention(self) -> str:
        return self.transformer.h[0].attn.attention

    @attention.setter
    def attention(self, value: str):
        """Switch every layer between "sdpa" and "explicit" (the weights stay)."""
        if value not in ATTENTIONS:
            raise ValueError(f"attention={value!r} is unknown; use one of {', '.join(ATTENTIONS)}")
        for block in self.transformer.h:
            block.attn.attention = value

    def _init_weights(self):
        """nanoGPT's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layer)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def head_weight(self) -> torch.Tensor:
        """(V, C): lm_head.weight, or transformer.wte.weight when tied."""
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the lookups (wpe, and wte unless it is the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if self.lm_head is not None:
                n -= self.transformer.wte.weight.numel()
        return n

    # ---- dropout sites ----------------------------------------------------------------------

    def dropout_mask_shapes(self, B: int, T: int) -> list[tuple]:
        """The shapes of the dropout sites of one training forward, in the order they run."""
        C, nh = self.config.n_embd, self.config.n_head
        return [(B, T, C)] + [(B, nh, T, T), (B, T, C), (B, T, C)] * self.config.n_layer

    def _dropout_plan(self, B: int, T: int, masks, like: torch.Tensor) -> DropoutPlan:
        p = self.config.dropout if self.training else 0.0
        if masks is None:
            return DropoutPlan(p, record=self.record_dropout_masks)
        masks = list(masks)
        if p == 0.0:
            if masks:
                raise ValueError(f"got {len(masks)} dropout_masks but dropout is off "
                                 f"(training={self.training}, dropout={self.config.dropout}); pass none")
            return DropoutPlan(0.0)
        shapes = self.dropout_mask_shapes(B, T)
        if len(masks) != len(shapes):
            raise ValueError(f"expected {len(shapes)} dropout_masks (embedding, then attention, attn "
                             f"residual, mlp residual per block), got {len(masks)}")
        scale = 1.0 / (1.0 - p)
        checked = []
        for i, (m, shape) in enumerate(zip(masks, shapes)):
            m = torch.as_tensor(m, device=like.device)
            if tuple(m.shape) != shape:
                raise ValueError(f"dropout_masks[{i}] has shape {tuple(m.shape)}, expected {shape}")
            if not m.is_floating_point():
                raise ValueError(f"dropout_masks[{i}] has dtype {m.dtype}; a mask holds keep / (1 - p) "
                                 "as floats")
            m = m.to(like.dtype)
            if not ((m == 0) | torch.isclose(m, torch.full_like(m, scale))).all():
                raise ValueError(f"dropout_masks[{i}] holds values other than 0 and 1/(1-p)={scale}")
            checked.append(m)
        return DropoutPlan(p, masks=checked)

    # ---- forward ----------------------------------------------------------------------------

    def _check_idx(self, idx: torch.Tensor, start_pos: int = 0):
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if start_pos + idx.size(1) > self.config.block_size:
            raise ValueError(f"cannot forward positions up to {start_pos + idx.size(1)}, "
                             f"block_size is only {self.config.block_size}")

    def _logits(self, x):
        return F.linear(self.transformer.ln_f(x), self.head_weight())  # (B, T, V)

    def _embed(self, idx, start_pos: int):
        """(tok_emb + pos_emb (B, T, C), rope): learned positions are added here; with RoPE
        nothing is added and rope = (cos, sin) (T, hs) of positions start_pos.. for the blocks."""
        T = idx.size(1)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "rope":
            rope = rope_cos_sin(T, self.config.head_size, self.config.rope_theta, start_pos,
                                tok_emb.dtype, idx.device)
            return tok_emb, rope
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)  # (T,)
        return tok_emb + self.transformer.wpe(pos), None  # wpe (T, C) broadcast over B

    def forward(self, idx, targets=None, dropout_masks=None):
        """idx (B, T) -> logits (B, T, V), loss (mean cross-entropy, or None without targets).

        dropout_masks: a list of 1 + 3*n_layer masks (see dropout_mask_shapes) used in place of
        random dropout; only meaningful in training mode with dropout > 0.
        """
        self._check_idx(idx)
        B, T = idx.size()
        x, rope = self._embed(idx, 0)  # (B, T, C)
        drop = self._dropout_plan(B, T, dropout_masks, x)
        x = drop(x)
        for block in self.transformer.h:
            x = block(x, drop, rope=rope)
        logits = self._logits(x)
        self.last_dropout_masks = drop.used
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def forward_cached(self, idx_new, kv_cache: KVCache, start_pos: int):
        """Logits (B, T_new, V) of positions start_pos.. given the cache of the positions before.

        Appends the new keys and values to `kv_cache`. Eval semantics: never any dropout.
        """
        self._check_idx(idx_new, start_pos)
        if start_pos != len(kv_cache):
            raise ValueError(f"start_pos={start_pos} but the cache holds {len(kv_cache)} positions")
        x, rope = self._embed(idx_new, start_pos)  # (B, T, C); rope angles offset by the cache
        for block, kv in zip(self.transformer.h, kv_cache.layers):
            x = block(x, NO_DROPOUT, kv, rope)
        return self._logits(x)

    def prefill(self, idx):
        """Run idx (B, T <= block_size) from position 0 into a fresh cache: (logits, kv_cache)."""
        kv_cache = KVCache(self.config.n_layer)
        return self.forward_cached(idx, kv_cache, 0), kv_cache

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, top_p: float | None = None):
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        The model sees at most the last block_size tokens. New tokens go through the KV cache;
        once the context is full every position shifts, so the cache is rebuilt from the last
        block_size tokens.
        """
        idx = _as_long_tensor(idx, self.transformer.wte.weight.device)
        bs = self.config.block_size
        if max_new_tokens <= 0:
            return idx
        logits, kv_cache = self.prefill(idx[:, -bs:])
        for step in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, top_p, rng, idx.device)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            if step == max_new_tokens - 1:
                break
            if len(kv_cache) == bs:
                logits, kv_cache = self.prefill(idx[:, -bs:])
            else:
                logits = self.forward_cached(nxt, kv_cache, len(kv_cache))
        return idx

    # ---- training helpers -------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_adamw(self, weight_decay, learning_rate, betas, device_type)

    def estimate_mfu(self, fwdbwd_per_iter, dt, flops_promised: float = 989e12):
        """Model FLOPs utilisation: achieved FLOP/s over `flops_promised` (H100 bf16 dense).

        FLOPs per token as in the PaLM paper appendix B: 6N for the weights, 12*L*H*Q*T for attention.
        """
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / flops_promised


# --------------------------------------------------------------------------------------------
# The lecture's baseline
# --------------------------------------------------------------------------------------------

class BigramLanguageModel(nn.Module):
    """Each token reads the logits of the next one straight from a (V, V) table."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)  # N(0, 1) init
        self.last_dropout_masks: list | None = []

    def forward(self, idx, targets=None, dropout_masks=None):
        if dropout_masks:
            raise ValueError("BigramLanguageModel has no dropout; pass no dropout_masks")
        logits = self.token_embedding_table(idx)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, top_p: float | None = None):
        idx = _as_long_tensor(idx, self.token_embedding_table.weight.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -1:])  # only the last token matters: (B, 1, V)
            idx = torch.cat((idx, _sample(logits, temperature, top_k, top_p, rng, idx.device)), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_adamw(self, weight_decay, learning_rate, betas, device_type)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _as_long_tensor(idx, device) -> torch.Tensor:
    if isinstance(idx, np.ndarray):
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        idx = torch.from_numpy(idx.astype(np.int64))
    if idx.dtype != torch.long:
        raise ValueError(f"idx must be a LongTensor, got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    return idx.to(device)


def _sample(logits, temperature, top_k, top_p, rng, device) -> torch.Tensor:
    """The shared NumPy sampler on the last position's logits (B, T, V) -> (B, 1) LongTensor."""
    last = logits[:, -1, :].double().cpu().numpy()  # (B, V) float64
    nxt = sample_next(last, temperature, top_k, rng, top_p)  # (B,)
    return torch.from_numpy(nxt).to(device).view(-1, 1)


def uses_muon(name: str, p: torch.Tensor) -> bool:
    """A matrix inside a block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj): Muon's."""
    return name.startswith("transformer.h.") and p.dim() == 2


class MuonAdamW:
    """torch.optim.Muon for the 2-D matrices inside the blocks and torch.optim.AdamW (nanoGPT's two
    groups) for the embeddings, the head and the 1-D gains and biases, behind one optimizer's
    interface (param_groups, state, step, zero_grad, state_dict, load_state_dict).

    Muon's group carries lr_scale = muon_lr / learning_rate: a caller that sets every group's lr from
    one schedule as lr * group.get("lr_scale", 1) moves both rates together.
    """

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.optimizers = {"adamw": adamw, "muon": muon}

    @property
    def param_groups(self) -> list:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.optimizers) - set(state))
        if missing:
            raise ValueError(f"optimizer state lacks {missing}: it was not saved with --optimizer muon")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def configure_muon_adamw(model: nn.Module, weight_decay, learning_rate, muon_lr, betas, device_type,
                         ns_dtype: str = "auto") -> MuonAdamW:
    """The speedrun split: Muon (lr muon_lr, torch's defaults otherwise, weight decay as AdamW's) for
    the matrices inside the blocks; AdamW for the rest, weight decay on its matrices (wte, lm_head).
    Muon is torchgpt.muon.Muon, torch's with its Newton-Schulz iteration in `ns_dtype` ("auto":
    torchgpt.muon.resolve_ns_dtype, bfloat16 but on a CPU that emulates it)."""
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"--optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks; "
                           "install torch >= 2.9 or use --optimizer adamw")
    from .muon import Muon, resolve_ns_dtype  # subclasses torch.optim.Muon: only once it is known to exist
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if uses_muon(n, p)]
    rest = [p for n, p in named if not uses_muon(n, p)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))
    muon = Muon([{"params": matrices, "lr_scale": muon_lr / learning_rate}], lr=muon_lr, weight_decay=weight_decay,
                ns_dtype=resolve_ns_dtype(ns_dtype, device_type))
    return MuonAdamW(adamw, muon)


def configure_adamw(model: nn.Module, weight_decay, learning_rate, betas, device_type):
    """AdamW as nanoGPT: weight decay on matrices and embeddings (dim >= 2), none on biases/norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = dict(fused=True) if fused else dict()
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
