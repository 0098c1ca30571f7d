"""Either script reads either backend's checkpoint: the same text for the same checkpoint and seed
(sampled and greedy), --init_from across backends, and a nanoGPT ckpt.pt (compiled-model key
prefixes, causal-mask buffers) giving the same logits in npgpt and torchgpt."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import DATA, check, needs_data, run_main, tiny_args, tiny_runs  # noqa: F401

from npgpt import bounds
from npgpt.config import GPTConfig
from npgpt.data import CharTokenizer
from torchgpt.model import GPT
from gptapp.backends import numpy as numpy_backend
from gptapp.backends import torch as torch_backend
from gptapp.torch_checkpoint import load_torch_checkpoint


@pytest.fixture
def checkpoints(tiny_runs):
    """One 20-step `tiny` run of each script: {"np": path to ckpt_last.npz, "torch": path to ckpt_last.pt}."""
    return {"np": tiny_runs["np"] / "ckpt_last.npz", "torch": tiny_runs["torch"] / "ckpt_last.pt"}


@pytest.mark.parametrize("source", ["np", "torch"])
@pytest.mark.parametrize("decoding", [["--temperature", 0.8, "--top_k", 40], ["--temperature", 0]],
                         ids=["sampled", "greedy"])
def test_both_scripts_sample_the_same_text(checkpoints, source, decoding, capsys):
    argv = ["sample", "--ckpt", checkpoints[source], "--prompt", "ROMEO:", "--max_new_tokens", 120,
            "--seed", 1, *decoding]
    np_res = run_main("np", argv, capsys)
    torch_res = run_main("torch", argv + ["--device", "cpu"], capsys)
    assert np_res.rc == torch_res.rc == 0, np_res.err + torch_res.err
    assert np_res.out.startswith("ROMEO:") and len(np_res.out) == len("ROMEO:") + 120 + 1
    assert np_res.out == torch_res.out, f"train_np:\n{np_res.out}\ntrain_torch:\n{torch_res.out}"


def test_both_scripts_sample_the_same_text_with_top_p(checkpoints, capsys):
    """--top_p after --top_k: the same text in both scripts, and not the text without it."""
    argv = ["sample", "--ckpt", checkpoints["np"], "--prompt", "ROMEO:", "--max_new_tokens", 120, "--seed", 1,
            "--temperature", 1.0, "--top_k", 40]
    np_res = run_main("np", argv + ["--top_p", 0.6], capsys)
    torch_res = run_main("torch", argv + ["--top_p", 0.6, "--device", "cpu"], capsys)
    unfiltered = run_main("np", argv, capsys)
    assert np_res.rc == torch_res.rc == unfiltered.rc == 0, np_res.err + torch_res.err + unfiltered.err
    assert np_res.out.startswith("ROMEO:") and len(np_res.out) == len("ROMEO:") + 120 + 1
    assert np_res.out == torch_res.out, f"train_np:\n{np_res.out}\ntrain_torch:\n{torch_res.out}"
    assert np_res.out != unfiltered.out


@pytest.mark.parametrize("target,source", [("np", "torch"), ("torch", "np")])
def test_init_from_the_other_backend(checkpoints, target, source, tmp_path, capsys):
    """Training starts from the other backend's weights: its first evaluation sees a trained model."""
    extra = ["--device", "cpu"] if target == "torch" else []
    res = run_main(target, tiny_args(tmp_path / "out", "--init_from", checkpoints[source], "--max_iters", 5,
                                     "--eval_interval", 5, *extra), capsys)
    assert res.rc == 0, res.err
    assert f"initialised from {checkpoints[source]}" in res.out
    first_val = float(res.out.split("step 0: train loss ")[1].split("val loss ")[1].split()[0])
    assert first_val < 3.95, f"val loss at step 0 is {first_val}: the weights were not loaded"  # untrained: ~4.17


# --------------------------------------------------------------------------- nanoGPT checkpoints

NANO_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=65, dropout=0.1)


def write_nanogpt_checkpoint(path, compiled: bool = True) -> GPT:
    """What nanoGPT's train.py saves: the (compiled) model's state dict with lm_head.weight tied to
    wte and the attn.bias causal-mask buffers, model_args, iter_num, best_val_loss (a tensor),
    config and optimizer. Returns the model that made it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(activation="gelu", tie_weights=True, **NANO_ARGS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    prefix = "_orig_mod." if compiled else ""
    sd = {}
    bs = NANO_ARGS["block_size"]
    for name, t in model.state_dict().items():
        sd[prefix + name] = t
        if name.endswith("ln_1.bias"):
            i = name.split(".")[2]
            sd[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs)
    sd[prefix + "lm_head.weight"] = sd[prefix + "transformer.wte.weight"]  # tied: the same tensor
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": sd, "model_args": dict(NANO_ARGS), "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": {"dataset": "shakespeare_char", "n_layer": 2},
                "optimizer": optimizer.state_dict()}, path)
    return model.eval()


@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_checkpoint_logits_match(tmp_path, compiled):
    path = tmp_path / "ckpt.pt"
    original = write_nanogpt_checkpoint(path, compiled)
    ckpt = load_torch_checkpoint(path)
    assert ckpt.backend == "nanogpt" and ckpt.iter_num == 250 and ckpt.vocab is None
    assert ckpt.gpt_config.tie_weights and ckpt.gpt_config.activation == "gelu"
    assert "lm_head.weight" not in ckpt.params and not any(k.endswith(".attn.bias") for k in ckpt.params)

    np_model = numpy_backend.model_from_checkpoint(ckpt)
    torch_model = torch_backend.model_from_checkpoint(ckpt, torch.device("cpu"))
    idx = np.random.default_rng(0).integers(0, 65, size=(3, 32))
    np_logits, _ = np_model.forward(idx)
    with torch.no_grad():
        torch_logits, _ = torch_model(torch.from_numpy(idx))
        original_logits, _ = original(torch.from_numpy(idx))
    # a forward only: half of a 2-layer model's PARITY_DEPTH stages, sums of at most 4 * n_embd terms
    check("npgpt vs torchgpt logits", np_logits, torch_logits,
          bounds.parity(np.float32, n=4 * NANO_ARGS["n_embd"], depth=bounds.PARITY_DEPTH // 2))
    check("torchgpt vs the model that saved it", torch_logits, original_logits,
          bounds.bitwise("one torchgpt GPT class, config and float32 weights, the same batch on the CPU"))


@needs_data
def test_nanogpt_checkpoint_samples_in_both_scripts(tmp_path, capsys, monkeypatch):
    """Vocabulary from --vocab, or by default Tiny Shakespeare's from the data loader (NPGPT_DATA)."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_checkpoint(path)
    base = ["sample", "--ckpt", path, "--prompt", "ROMEO:", "--max_new_tokens", 60, "--seed", 7, "--top_k", 40]
    texts = [run_main("np", base + ["--vocab", DATA], capsys),
             run_main("torch", base + ["--vocab", DATA, "--device", "cpu"], capsys)]
    monkeypatch.setenv("NPGPT_DATA", str(DATA))
    texts += [run_main("np", base, capsys), run_main("torch", base + ["--device", "cpu"], capsys)]
    assert all(r.rc == 0 for r in texts), [r.err for r in texts]
    assert len({r.out for r in texts}) == 1, [r.out for r in texts]
    assert texts[0].out.startswith("ROMEO:")
    vocab = set(CharTokenizer.from_text(DATA.read_text(encoding="utf-8")).chars)
    assert set(texts[0].out.rstrip("\n")) <= vocab


@needs_data
def test_init_from_nanogpt_checkpoint(tmp_path, capsys):
    """Fine-tuning a nanoGPT model: its shape and (by default) the training text's vocabulary."""
    path = tmp_path / "ckpt.pt"
    write_nanogpt_checkpoint(path)
    res = run_main("np", ["--init_from", path, "--data", DATA, "--out_dir", tmp_path / "out", "--max_iters", 2,
                          "--eval_interval", 2, "--eval_iters", 1, "--batch_size", 2, "--max_new_tokens", 5], capsys)
    assert res.rc == 0, res.err
    assert "(nanogpt)" in res.out
    ckpt = numpy_backend.read_any_checkpoint(tmp_path / "out" / "ckpt_last.npz")
    assert ckpt.gpt_config.n_embd == 32 and ckpt.gpt_config.block_size == 32 and ckpt.gpt_config.bias



def test_the_sample_after_training_takes_top_p(tmp_path, capsys):
    """Training's --top_k and --top_p reach the sample printed at the end: it is the sample command's text
    for the checkpoint saved at the last step, with the same flags and the run's seed. (train_np.py only:
    both scripts print it through gptapp.loop, and the sample command's top_p is compared across them.)"""
    decoding = ["--temperature", 1.0, "--top_k", 40, "--max_new_tokens", 40]
    res = run_main("np", tiny_args(tmp_path / "out", "--max_iters", 2, "--eval_interval", 2, "--eval_iters", 1,
                                   "--prompt", "ROMEO:", *decoding, "--top_p", 0.6), capsys)
    assert res.rc == 0, res.err
    argv = ["sample", "--ckpt", tmp_path / "out" / "ckpt_last.npz", "--prompt", "ROMEO:", "--seed", 1337, *decoding]
    sampled = run_main("np", argv + ["--top_p", 0.6], capsys)
    unfiltered = run_main("np", argv, capsys)
    assert sampled.rc == unfiltered.rc == 0, sampled.err + unfiltered.err
    assert sampled.out.startswith("ROMEO:") and sampled.out in res.out
    assert unfiltered.out != sampled.out
