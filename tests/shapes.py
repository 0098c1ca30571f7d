"""The one parameter-shape oracle of the tests: what a GPTConfig's parameters are called and shaped.

tests/test_model.py checks npgpt's GPT and param_shapes against it, parity_tests/test_model.py
torchgpt's named_parameters() (parity_tests reach it through parity_tests/twins.py).
"""
from __future__ import annotations


def expected_param_shapes(config) -> dict:
    """Every parameter's name and shape, in nanoGPT's named_parameters() order (q_norm and k_norm after
    attn.c_proj, as the modules register), written from the contract independently of
    npgpt/model.py's param_shapes: nn.Linear's (out, in) layout, no wpe with RoPE, no norm biases
    with RMSNorm or without bias, swiglu's c_fc (2H, C), no lm_head when tied."""
    V, C, bs, hs, H = config.vocab_size, config.n_embd, config.block_size, config.head_size, config.mlp_hidden_size
    shapes = {"transformer.wte.weight": (V, C)}
    if config.pos_emb == "learned":
        shapes["transformer.wpe.weight"] = (bs, C)
    norm_bias = config.bias and config.norm == "layernorm"
    fc = 2 * H if config.activation == "swiglu" else H
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        if norm_bias:
            shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (3 * C, C)
        if config.bias:
            shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        if config.bias:
            shapes[p + "attn.c_proj.bias"] = (C,)
        if config.qk_norm:
            shapes[p + "attn.q_norm.weight"] = (hs,)
            shapes[p + "attn.k_norm.weight"] = (hs,)
        shapes[p + "ln_2.weight"] = (C,)
        if norm_bias:
            shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (fc, C)
        if config.bias:
            shapes[p + "mlp.c_fc.bias"] = (fc,)
        shapes[p + "mlp.c_proj.weight"] = (C, H)
        if config.bias:
            shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["transformer.ln_f.weight"] = (C,)
    if norm_bias:
        shapes["transformer.ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes
