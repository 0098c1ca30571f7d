"""GPT-2's byte-level BPE tokenizer (interface; the implementation lands with its tests).

    tok = BPETokenizer.from_files("vocab.json", "merges.txt")
    ids = tok.encode("Hello world")      # list[int]
    tok.decode(ids) == "Hello world"
"""
from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file that does not parse; the message is one line naming the file and the fix."""


class BPETokenizer:
    eot_token = "<|endoftext|>"

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        raise NotImplementedError

    @classmethod
    def from_files(cls, vocab_path, merges_path) -> "BPETokenizer":
        raise NotImplementedError

    @classmethod
    def from_strings(cls, vocab_json: str, merges_txt: str, source: str = "the tokenizer") -> "BPETokenizer":
        raise NotImplementedError

    def to_strings(self) -> tuple[str, str]:
        raise NotImplementedError

    def save(self, folder) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError
