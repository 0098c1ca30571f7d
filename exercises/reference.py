"""The model exercise's reference pair: GPT.forward and GPT.backward (npgpt/model.py) written as
functions of their inputs and cache, for a config with tied weights and learned positions.

model_forward(idx, targets, params, config) -> (loss, GPTCache) runs the same layers in the same
order as GPT.forward with dropout off; model_backward(dloss, cache) -> {name: gradient} is
GPT.backward's composition with the upstream gradient dloss of the loss (GPT.backward's is 1).
"""
from __future__ import annotations

from npgpt.layers import (BlockOptions, block_backward, block_forward, cross_entropy_backward,
                          cross_entropy_forward, embedding_backward, embedding_forward, linear_backward,
                          linear_forward, norm_backward, norm_forward)
from npgpt.model import GPTCache


def model_forward(idx, targets, params, config):
    """loss = cross_entropy(ln_f(blocks(wte[idx] + wpe[:T])) @ wte.T, targets): the head reuses wte.

    idx, targets (B, T) int; params keyed by nanoGPT's names ("transformer.wte.weight", ...).
    Returns (loss, GPTCache), the cache GPT.forward keeps (no dropout: its entry is None).
    """
    x, c_emb = embedding_forward(idx, params["transformer.wte.weight"], params.get("transformer.wpe.weight"))
    options = BlockOptions.of(config)
    c_blocks = []
    for i in range(config.n_layer):
        prefix = f"transformer.h.{i}."
        p = {name[len(prefix):]: w for name, w in params.items() if name.startswith(prefix)}
        x, c = block_forward(x, p, options)  # (B, T, C)
        c_blocks.append(c)
    x, c_lnf = norm_forward(x, params["transformer.ln_f.weight"], params.get("transformer.ln_f.bias"), options)
    logits, c_head = linear_forward(x, params["transformer.wte.weight"])  # (B, T, V), the tied head
    loss, c_loss = cross_entropy_forward(logits, targets)
    return float(loss), GPTCache(c_emb, None, c_blocks, c_lnf, c_head, c_loss)


def model_backward(dout, cache):
    """Every parameter's gradient of the loss, given dout = dloss: loss, head, ln_f, the blocks from
    the last to the first, the embedding; the tied wte collects the embedding's and the head's."""
    grads = {}
    (dlogits,) = cross_entropy_backward(dout, cache.loss)  # (B, T, V)
    dx, dhead, _ = linear_backward(dlogits, cache.lm_head)  # dhead (V, C)
    dx, grads["transformer.ln_f.weight"], db = norm_backward(dx, cache.ln_f)
    if db is not None:
        grads["transformer.ln_f.bias"] = db
    for i in reversed(range(len(cache.blocks))):
        dx, block_grads = block_backward(dx, cache.blocks[i])  # residual fan-in inside each block
        for name, g in block_grads.items():
            grads[f"transformer.h.{i}.{name}"] = g
    dwte, dwpe = embedding_backward(dx, cache.embedding)
    if dwpe is not None:
        grads["transformer.wpe.weight"] = dwpe
    grads["transformer.wte.weight"] = dwte + dhead  # one matrix used twice: the two gradients add
    return grads

