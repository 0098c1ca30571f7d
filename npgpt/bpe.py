"""GPT-2's byte-level BPE tokenizer: text -> token ids -> text, standard library only.

    tok = BPETokenizer.from_files("vocab.json", "merges.txt")   # HF names; GPT-2's are encoder.json, vocab.bpe
    ids = tok.encode("Hello world")      # [15496, 995]
    tok.decode(ids) == "Hello world"

How GPT-2 turns text into ids, in four steps:

1. Special token. The literal string "<|endoftext|>" becomes its own id (50256) wherever it
   appears, as Hugging Face's GPT2Tokenizer does and tiktoken does with
   `allowed_special={"<|endoftext|>"}`; the text between such markers is encoded as below.
2. Pre-tokenizer. A regular expression cuts the text into words, each merged on its own:
       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
   i.e. an English contraction, or a run of letters, of digits, or of other symbols, each with
   at most one leading space, or a run of whitespace. `\\s+(?!\\S)` takes a whitespace run
   but leaves its last character to the word that follows ("a   b" -> "a", "  ", " b"). Python's
   `re` has no \\p{L} (letters) or \\p{N} (digits and other numbers), so `pretokenizer()` builds
   them once from `unicodedata.category` as explicit character classes, and spells \\s as the
   Unicode White_Space property, which is what the `regex` module (GPT-2's) means by \\s.
3. Bytes to symbols. Each word is encoded as UTF-8, and each byte is shown as one printable
   character (`bytes_to_unicode`): the 188 printable Latin-1 bytes stand for themselves, the
   other 68 (controls, space, NBSP, soft hyphen) are moved to U+0100.. so that a space is "Ġ"
   and a newline "Ċ". The vocabulary and the merges are written in these symbols.
4. Merge loop. merges.txt lists pairs of symbols by rank (its line order: the order in which
   BPE training learned them). Starting from one symbol per byte, the loop repeatedly finds the
   adjacent pair with the lowest rank, merges every occurrence of it, and stops when no adjacent
   pair is in the list; the final symbols are looked up in vocab.json.

Decoding joins the bytes of each id and decodes them as UTF-8 with errors="replace" (as GPT-2
does): a sequence of ids that ends inside a multi-byte character shows U+FFFD there.

Round trip: decode(encode(s)) == s for every string of Unicode characters. A Python str can also
hold surrogate code points (U+D800..U+DFFF), which are not characters and have no UTF-8 encoding;
encode treats them as tiktoken does: a high surrogate followed by a low one is joined into the
character they stand for, and every other surrogate is replaced by U+FFFD (Hugging Face's
tokenizers refuses such a str with a TypeError).

The letter and number classes come from this Python's `unicodedata` (Unicode 14.0 on Python
3.11). A code point assigned in a later Unicode version is "other" here, so text using such new
letters may be cut differently than by a reference built on newer tables (Hugging Face's
tokenizers knows the letters of Unicode 16, e.g. U+1C89; tiktoken agrees with the tables here).

Cache: pre-tokens repeat (Zipf's law: a few words make up most of any text), so the ids of each
word are kept in a dict and the merge loop runs once per distinct word. The dict is bounded:
after CACHE_SIZE distinct words it stops taking new entries, which keeps memory fixed when a long
corpus brings a long tail of rare words (numbers, names, hashes); the frequent words arrive early
and are in it by then.
"""
from __future__ import annotations

import functools
import json
import operator
import os
import re
import sys
import tempfile
import unicodedata
from pathlib import Path

CACHE_SIZE = 1 << 16     # distinct pre-tokens whose ids are kept (Tiny Shakespeare has about 15k)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The Unicode White_Space property, the `regex` module's \s. str.isspace() agrees except that it
# also counts the four information separators U+001C..U+001F, which are not White_Space.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
               "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


class TokenizerError(ValueError):
    """A tokenizer file that does not parse; the message is one line naming the file and the fix."""


# --------------------------------------------------------------------------- bytes to symbols

@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte value (0..255) -> the one printable character that stands for it in vocab and merges.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ': 188 of them) map to themselves; the
    other 68 map, in byte order, to U+0100, U+0101, ... (so b' ' -> 'Ġ', b'\\n' -> 'Ċ'). None of
    the 256 symbols is whitespace, so a merge line "Ġ t" splits cleanly on its space.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


# --------------------------------------------------------------------------- pre-tokenizer

def _class_body(ranges: list[tuple[int, int]]) -> str:
    """A `re` character-class body for the code point ranges [(first, last), ...]."""
    return "".join(rf"\U{a:08x}" if a == b else rf"\U{a:08x}-\U{b:08x}" for a, b in ranges)


def _ranges(codes) -> list[tuple[int, int]]:
    """Ascending code points -> maximal runs [(first, last), ...]."""
    runs: list[list[int]] = []
    for c in codes:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return [(a, b) for a, b in runs]


@functools.cache
def character_classes() -> dict[str, str]:
    """`re` character-class bodies for \\p{L} (letters), \\p{N} (numbers) and \\s (White_Space).

    Built once from `unicodedata.category` (a scan of all 1.1M code points, a fraction of a second).
    """
    letters, numbers = [], []
    for c in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(c))[0]     # 'Lu' -> 'L', 'Nd' -> 'N', ...
        if major == "L":
            letters.append(c)
        elif major == "N":
            numbers.append(c)
    return {"L": _class_body(_ranges(letters)), "N": _class_body(_ranges(numbers)),
            "s": _class_body(_ranges(sorted(map(ord, WHITE_SPACE))))}


@functools.cache
def pretokenizer() -> re.Pattern:
    """GPT2_PATTERN compiled for Python's `re`, with \\p{L}, \\p{N} and \\s as explicit classes.

    `re` does the same leftmost-alternative matching and backtracking as `regex` does for the
    original pattern, so the pre-tokens are the same.
    """
    L, N, S = (character_classes()[k] for k in "LNs")
    pattern = (r"'s|'t|'re|'ve|'m|'ll|'d"
               rf"| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"     # letters, numbers, other symbols
               rf"|[{S}]+(?![^{S}])|[{S}]+")              # \s+(?!\S)|\s+
    return re.compile(pattern)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD (tiktoken's rule)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# --------------------------------------------------------------------------- tokenizer

class BPETokenizer:
    """GPT-2's tokenizer from its vocabulary (symbol string -> id) and its merges (pairs, by rank).

    `from_files` / `from_strings` read the two files and raise TokenizerError for anything that
    does not parse; `to_strings` gives them back (what a checkpoint stores), `save` writes them.
    """
    eot_token = "<|endoftext|>"

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], *,
                 vocab_name: str = "the vocabulary", merges_name: str = "the merges", merges_first_line: int = 1):
        """vocab_name / merges_name name the two sources in errors; merge k sits on line
        k + merges_first_line of its file (2 when a "#version" line comes first)."""
        self.encoder: dict[str, int] = dict(encoder)
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merges]
        _check_vocab(self.encoder, vocab_name)
        for k, m in enumerate(self.merges):
            if len(m) != 2 or not all(isinstance(s, str) for s in m):
                raise TokenizerError(f"{merges_name} line {k + merges_first_line}: expected two symbols (a, b), "
                                     f"got {m!r}; pass the tokenizer's merges")
        self.ranks: dict[tuple[str, str], int] = {}                    # pair -> rank (lower merges first)
        for k, (a, b) in enumerate(self.merges):
            where = f"{merges_name} line {k + merges_first_line}"
            if a not in self.encoder or b not in self.encoder or a + b not in self.encoder:
                missing = [s for s in (a, b, a + b) if s not in self.encoder]
                raise TokenizerError(f"{where}: the merge {a!r} + {b!r} uses {missing[0]!r}, which {vocab_name} lacks; "
                                     "vocab and merges must come from the same tokenizer")
            if (a, b) in self.ranks:
                raise TokenizerError(f"{where}: the merge {a!r} + {b!r} repeats line "
                                     f"{self.ranks[(a, b)] + merges_first_line}; use the tokenizer's original merges file")
            self.ranks[(a, b)] = k
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        to_latin1 = str.maketrans({ch: chr(b) for b, ch in bytes_to_unicode().items()})   # symbol -> its byte
        self.token_bytes: list[bytes] = [self.decoder[i].translate(to_latin1).encode("latin-1")  # id -> its bytes
                                         for i in range(len(self.decoder))]
        self.byte_symbols: list[str] = [bytes_to_unicode()[b] for b in range(256)]      # byte -> symbol
        self.cache: dict[str, tuple[int, ...]] = {}                                     # pre-token -> ids

    # ----------------------------------------------------------------------- files

    @classmethod
    def from_files(cls, vocab_path, merges_path) -> "BPETokenizer":
        """vocab.json (GPT-2's encoder.json) and merges.txt (GPT-2's vocab.bpe)."""
        vocab_text = _read_text(vocab_path, "vocab.json (GPT-2's encoder.json)")
        merges_text = _read_text(merges_path, "merges.txt (GPT-2's vocab.bpe)")
        return cls._parse(vocab_text, str(vocab_path), merges_text, str(merges_path))

    @classmethod
    def from_strings(cls, vocab_json: str, merges_txt: str, source: str = "the tokenizer") -> "BPETokenizer":
        """The two files' contents, e.g. from a checkpoint; `source` names where they came from."""
        return cls._parse(vocab_json, f"{source} (vocab.json)", merges_txt, f"{source} (merges.txt)")

    @classmethod
    def _parse(cls, vocab_text: str, vocab_name: str, merges_text: str, merges_name: str) -> "BPETokenizer":
        encoder = _parse_vocab(vocab_text, vocab_name)
        merges, first_line = _parse_merges(merges_text, merges_name)
        return cls(encoder, merges, vocab_name=vocab_name, merges_name=merges_name, merges_first_line=first_line)

    def to_strings(self) -> tuple[str, str]:
        """(vocab_json, merges_txt): `from_strings(*tok.to_strings())` rebuilds this tokenizer."""
        by_id = dict(sorted(self.encoder.items(), key=lambda kv: kv[1]))
        vocab_json = json.dumps(by_id, ensure_ascii=False, separators=(",", ":"))
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        return vocab_json, merges_txt

    def save(self, folder) -> None:
        """Write vocab.json and merges.txt into `folder` (made if missing; same-named files replaced)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in zip(("vocab.json", "merges.txt"), self.to_strings()):
            _write_atomic(folder / name, text)

    # ----------------------------------------------------------------------- sizes

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eot_id(self) -> int:
        if self.eot_token not in self.encoder:
            raise ValueError(f"this vocabulary has no {self.eot_token!r} token; use GPT-2's vocab.json")
        return self.encoder[self.eot_token]

    # ----------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """str -> token ids; "<|endoftext|>" in the text becomes eot_id (see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        text = _without_surrogates(text)
        if self.eot_token not in self.encoder:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for k, piece in enumerate(text.split(self.eot_token)):
            if k > 0:
                ids.append(self.encoder[self.eot_token])
            ids.extend(self._encode_ordinary(piece))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Pre-tokenize, then each pre-token's ids from the cache or the merge loop."""
        ids: list[int] = []
        for word in pretokenizer().findall(text):
            word_ids = self.cache.get(word)
            if word_ids is None:
                word_ids = tuple(self.encoder[s] for s in self.bpe(word))
                if len(self.cache) < CACHE_SIZE:
                    self.cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def bpe(self, word: str) -> list[str]:
        """One pre-token -> its final symbols: "Ġhello" -> ['Ġhello'], " tokenizer" -> ['Ġtoken', 'izer']."""
        symbols = [self.byte_symbols[b] for b in word.encode("utf-8")]     # one symbol per byte
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break                                      # no adjacent pair is a merge: done
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):                        # every occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def decode(self, ids) -> str:
        """Token ids (any iterable of ints) -> str; bytes that are not valid UTF-8 show as U+FFFD."""
        parts: list[bytes] = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise ValueError(f"token ids must be integers, got {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size}) of this vocabulary")
            parts.append(self.token_bytes[i])
        return b"".join(parts).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


# --------------------------------------------------------------------------- parsing and checks

def _read_text(path, what: str) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file; pass the tokenizer's {what}") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read it ({e.strerror or e}); pass a readable {what}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start}); pass the tokenizer's {what}") from None


def _parse_vocab(text: str, name: str) -> dict[str, int]:
    fix = "pass the tokenizer's vocab.json (GPT-2's encoder.json)"
    if not text.strip():
        raise TokenizerError(f"{name}: the file is empty; {fix}")
    try:
        encoder = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{name}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{name}: expected a JSON object of token -> id, got a {type(encoder).__name__}; {fix}")
    return encoder


def _check_vocab(encoder: dict, name: str) -> None:
    """Every id an int, each of 0..N-1 exactly once, every token made of byte symbols, all 256 bytes present."""
    fix = "pass the tokenizer's vocab.json (GPT-2's encoder.json)"
    if not encoder:
        raise TokenizerError(f"{name}: the vocabulary is empty; {fix}")
    seen: dict[int, str] = {}
    symbols = set(bytes_to_unicode().values())
    for token, i in encoder.items():
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"{name}: token {token!r} is not a non-empty string; {fix}")
        if type(i) is not int:
            raise TokenizerError(f"{name}: token {token!r} has id {i!r}, not an integer; {fix}")
        if i in seen:
            raise TokenizerError(f"{name}: id {i} is given to both {seen[i]!r} and {token!r}; {fix}")
        seen[i] = token
        if not symbols.issuperset(token):
            outside = [ch for ch in token if ch not in symbols]
            raise TokenizerError(f"{name}: token {token!r} holds {outside[0]!r}, which is not one of the 256 "
                                 f"byte symbols of a byte-level BPE; {fix}")
    if min(seen) != 0 or max(seen) != len(seen) - 1:
        gap = next(i for i in range(len(seen)) if i not in seen)
        raise TokenizerError(f"{name}: ids must run 0..{len(seen) - 1} with none missing, but {gap} is missing; {fix}")
    missing = [b for b, ch in bytes_to_unicode().items() if ch not in encoder]
    if missing:
        raise TokenizerError(f"{name}: no token for byte {missing[0]} ({bytes_to_unicode()[missing[0]]!r}) "
                             f"({len(missing)} of the 256 bytes lack one), so some text cannot be encoded; {fix}")


def _parse_merges(text: str, name: str) -> tuple[list[tuple[str, str]], int]:
    """merges.txt -> ([(a, b), ...] by rank, the line number of the first merge)."""
    fix = "pass the tokenizer's merges.txt (GPT-2's vocab.bpe): one merge 'a b' per line"
    if not text.strip():
        raise TokenizerError(f"{name}: the file is empty; {fix}")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()                                  # the newline that ends the last line
    first_line = 1
    if lines and lines[0].startswith("#version"):
        lines, first_line = lines[1:], 2
    merges = []
    for k, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{name} line {k + first_line}: expected two symbols 'a b', got {line!r}; {fix}")
        merges.append((parts[0], parts[1]))
    return merges, first_line


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a failure never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
