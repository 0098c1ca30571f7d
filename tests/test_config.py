"""Unit tests of npgpt.config.GPTConfig: validation names the field and the value; from_dict is strict."""
from __future__ import annotations

import math
import re

import pytest

from npgpt import GPTConfig

VALID = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)


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
    assert d == {**VALID, "dropout": 0.2, "bias": False, "activation": "gelu_tanh", "tie_weights": False}
    assert GPTConfig.from_dict(d) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown fields \['dropuot', 'n_ctx'\]"):
        GPTConfig.from_dict({**VALID, "n_ctx": 32, "dropuot": 0.1})


def test_from_dict_still_validates():
    with pytest.raises(ValueError, match="n_embd=64 is not divisible by n_head=5"):
        GPTConfig.from_dict({**VALID, "n_head": 5})
