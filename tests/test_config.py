"""Unit tests of npgpt.config.GPTConfig: validation names the field and the value; from_dict is strict."""
from __future__ import annotations

import math
import re

import pytest

from npgpt import GPTConfig

VALID = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)
# The modern block's fields (issue 11) and their defaults, which are the lecture's model.
MODERN_DEFAULTS = dict(norm="layernorm", norm_eps=1e-5, pos_emb="learned", rope_theta=10000.0,
                       qk_norm=False, mlp_hidden=None)


def make(**overrides) -> GPTConfig:
    return GPTConfig(**{**VALID, **overrides})


def test_valid_config_and_defaults():
    config = make()
    assert (config.dropout, config.bias, config.activation, config.tie_weights) == (0.0, True, "gelu", True)
    assert config.head_size == 16
    assert make(n_embd=6, n_head=3).head_size == 2
    assert make(n_embd=5, n_head=5, dropout=0.999, activation="relu").head_size == 1
    for activation in ("relu", "gelu", "gelu_tanh"):
        assert make(activation=activation).activation == activation


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -3, 2.0, True, "8", None])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError) as exc:
        make(**{field: value})
    msg = str(exc.value)
    assert f"GPTConfig.{field}" in msg and repr(value) in msg, msg


@pytest.mark.parametrize("n_embd,n_head", [(10, 4), (6, 4), (5, 2), (64, 3)])
def test_n_embd_must_divide_by_n_head(n_embd, n_head):
    with pytest.raises(ValueError, match=rf"n_embd={n_embd}\b.*n_head={n_head}\b"):
        make(n_embd=n_embd, n_head=n_head)


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5, math.nan, "0.1"])
def test_dropout_must_lie_in_0_1(dropout):
    with pytest.raises(ValueError, match=rf"GPTConfig\.dropout.*{re.escape(repr(dropout))}"):
        make(dropout=dropout)


@pytest.mark.parametrize("activation", ["swish", "GELU", "", "tanh"])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match=rf"activation={re.escape(repr(activation))}.*relu, gelu, gelu_tanh"):
        make(activation=activation)


@pytest.mark.parametrize("field", ["bias", "tie_weights"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_must_be_bools(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}.*{re.escape(repr(value))}"):
        make(**{field: value})


def test_dict_round_trip():
    config = make(dropout=0.2, bias=False, activation="gelu_tanh", tie_weights=False)
    d = config.to_dict()
    assert d == {**VALID, "dropout": 0.2, "bias": False, "activation": "gelu_tanh", "tie_weights": False,
                 **MODERN_DEFAULTS}
    assert GPTConfig.from_dict(d) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown fields \['dropuot', 'n_ctx'\]"):
        GPTConfig.from_dict({**VALID, "n_ctx": 32, "dropuot": 0.1})


def test_from_dict_still_validates():
    with pytest.raises(ValueError, match="n_embd=64 is not divisible by n_head=5"):
        GPTConfig.from_dict({**VALID, "n_head": 5})


# --------------------------------------------------------------------------------------------
# The modern block's fields (issue 11)
# --------------------------------------------------------------------------------------------

def test_modern_defaults_are_the_lecture_model():
    config = make()
    assert {name: getattr(config, name) for name in MODERN_DEFAULTS} == MODERN_DEFAULTS
    assert config.mlp_hidden_size == 4 * 64
    assert make(mlp_hidden=96).mlp_hidden_size == 96
    assert make(mlp_hidden=96, activation="swiglu").mlp_hidden_size == 96  # H, not 2H


def test_old_checkpoint_dict_loads_with_todays_behaviour():
    """A config dict saved before the modern fields existed: the missing keys take the defaults."""
    old = {**VALID, "dropout": 0.1, "bias": False, "activation": "relu", "tie_weights": False}
    config = GPTConfig.from_dict(old)
    assert config == GPTConfig(**old)
    assert config.to_dict() == {**old, **MODERN_DEFAULTS}


def test_modern_values_accepted_and_round_trip():
    config = make(norm="rmsnorm", norm_eps=1e-6, pos_emb="rope", rope_theta=500.0, qk_norm=True,
                  mlp_hidden=100, activation="swiglu")
    assert GPTConfig.from_dict(config.to_dict()) == config
    for activation in ("relu2", "swiglu"):
        assert make(activation=activation).activation == activation
    assert make(rope_theta=10000).rope_theta == 10000  # an int is a fine number


@pytest.mark.parametrize("field,value,allowed", [
    ("norm", "RMSNorm", "layernorm, rmsnorm"), ("norm", "batchnorm", "layernorm, rmsnorm"),
    ("pos_emb", "alibi", "learned, rope"), ("pos_emb", None, "learned, rope"),
    ("activation", "geglu", "relu, gelu, gelu_tanh, relu2, swiglu"),
])
def test_unknown_modern_choices(field, value, allowed):
    with pytest.raises(ValueError) as exc:
        make(**{field: value})
    msg = str(exc.value)
    assert f"GPTConfig.{field}={value!r} is unknown; use one of {allowed}" == msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("field", ["norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [0, 0.0, -1e-5, math.inf, math.nan, True, "1e-5", None])
def test_eps_and_theta_must_be_positive_numbers(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field} must be a positive number, got {re.escape(repr(value))}"):
        make(**{field: value})


@pytest.mark.parametrize("value", [0, -4, 2.0, True, "128"])
def test_mlp_hidden_must_be_positive_int_or_none(value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.mlp_hidden must be a positive integer or None.*"
                                         rf"got {re.escape(repr(value))}"):
        make(mlp_hidden=value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_qk_norm_must_be_bool(value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.qk_norm must be True or False, got {re.escape(repr(value))}"):
        make(qk_norm=value)


@pytest.mark.parametrize("n_embd,n_head", [(15, 5), (9, 3), (7, 7)])
def test_rope_needs_an_even_head_size(n_embd, n_head):
    with pytest.raises(ValueError, match=rf"pos_emb='rope' needs an even head size.*"
                                         rf"{n_embd} // {n_head} = {n_embd // n_head}; choose"):
        make(n_embd=n_embd, n_head=n_head, pos_emb="rope")
    assert make(n_embd=n_embd, n_head=n_head).head_size % 2 == 1  # learned positions don't care
