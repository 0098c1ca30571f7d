"""gptapp.loop's rules, shared by both backends: the learning-rate schedule, the evaluation seeding
(one rule for numpy and torch), the non-finite message, and what --reference picks."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from train_helpers import check, needs_data, run_main, tiny_args

import npgpt
import npgpt.fast
import npgpt.optim
from gptapp.backends import numpy as numpy_backend
from gptapp.checkpoint import load_npz
from gptapp.loop import eval_seed, learning_rate_at, non_finite_message
from gptapp.settings import PRESETS
from npgpt import bounds
from npgpt.data import CharTokenizer, train_val_split
from npgpt.optim import cosine_lr

TINY = PRESETS["tiny"]
TEXT = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), size=4000))


def test_learning_rate_follows_the_preset():
    assert learning_rate_at(replace(TINY, decay_lr=False), 30) == TINY.learning_rate
    for it in (0, 3, 5, 20, 40):
        assert learning_rate_at(TINY, it) == cosine_lr(it, TINY.learning_rate, TINY.warmup_iters,
                                                       TINY.lr_decay_iters, TINY.min_lr)


def test_eval_seed_is_one_per_step_and_split():
    seeds = {eval_seed(1337, it, k) for it in range(0, 5000, 250) for k in (0, 1)}
    assert len(seeds) == 2 * 20
    assert eval_seed(1337, 250, 1) == eval_seed(1337, 250, 1) != eval_seed(1338, 250, 1)


def test_non_finite_message_names_the_step_the_value_and_the_checkpoint():
    line = non_finite_message(7, ("out/ckpt_last.npz", 5), value=float("nan"))
    assert "(nan) at step 7" in line and "out/ckpt_last.npz (step 5) is the last good checkpoint" in line
    assert "(nan or inf) at step 3" in non_finite_message(3, None)
    assert "no checkpoint was written" in non_finite_message(3, None)


def test_reference_picks_the_plain_layers_and_the_default_the_fast_path():
    assert numpy_backend.model_classes(True) == (npgpt.GPT, npgpt.BigramLanguageModel, npgpt.optim.AdamW,
                                                 npgpt.optim.clip_grad_norm)
    assert numpy_backend.model_classes(False) == (npgpt.fast.GPT, npgpt.fast.BigramLanguageModel,
                                                  npgpt.fast.AdamW, npgpt.fast.clip_grad_norm)


def numpy_run(reference: bool):
    """(backend set up on a synthetic text, a function returning its training stream's state)"""
    tokenizer = CharTokenizer.from_text(TEXT)
    train_data, val_data = train_val_split(tokenizer.encode(TEXT))
    backend = numpy_backend.NumpyBackend(reference=reference)
    backend.build(TINY, tokenizer, train_data, val_data, None, resume=False)
    return backend, lambda: repr(backend.data_rng.bit_generator.state)


def torch_run():
    pytest.importorskip("torch")
    from gptapp.backends.torch import TorchBackend, TorchOptions
    tokenizer = CharTokenizer.from_text(TEXT)
    train_data, val_data = train_val_split(tokenizer.encode(TEXT))
    backend = TorchBackend(TorchOptions(device="cpu", dtype="float32", compile=False, attention="sdpa"))
    backend.build(TINY, tokenizer, train_data, val_data, None, resume=False)
    return backend, lambda: backend.batches["train"].generator.get_state().tolist()


@pytest.mark.parametrize("make", [lambda: numpy_run(True), torch_run], ids=["numpy", "torch"])
def test_evaluation_never_shifts_the_training_batches(make):
    backend, training_stream_state = make()
    state = training_stream_state()
    first = backend.evaluate(20)
    again = backend.evaluate(20)
    later = backend.evaluate(40)
    assert training_stream_state() == state, "evaluating drew from the training stream"
    assert first == again, "the same step evaluated twice gave different losses"
    assert first != later, "two steps evaluated on the same batches"
    assert first["train"] != first["val"]


@needs_data
def test_reference_and_fast_path_train_to_the_same_weights(tmp_path, capsys):
    """--reference and the default run the same recipe: the same weights to float32 rounding. The
    fast path's kernels add their sums in other orders: a chain over the 10 steps' forward and
    backward passes of the 2-layer `tiny` model (sums of at most 4 C = B T = 128 terms)."""
    steps = 10
    runs = {}
    for name, extra in (("fast", []), ("reference", ["--reference"])):
        res = run_main("np", tiny_args(tmp_path / name, "--max_iters", steps, "--eval_interval", steps, *extra),
                       capsys)
        assert res.rc == 0, res.err
        runs[name] = load_npz(tmp_path / name / "ckpt_last.npz")
    bound = bounds.chain(np.float32, n=4 * TINY.n_embd, depth=steps * bounds.PARITY_DEPTH,
                         amplification=bounds.PARITY_AMPLIFICATION)
    for key, want in runs["reference"].params.items():
        check(key, runs["fast"].params[key], want, bound)
