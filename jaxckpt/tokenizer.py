"""Tokenizers: a built-in byte-level one, or a user's SentencePiece / Hugging Face file."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); nothing to download or train."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        try:
            import sentencepiece as spm
        except ImportError:
            msg = f"{path}: install sentencepiece to use a .model tokenizer (pip install sentencepiece)"
            raise SystemExit(msg) from None
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name, self.vocab_size = f"sentencepiece:{path}", int(self._sp.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise SystemExit(f"{path}: install tokenizers to use a tokenizer.json (pip install tokenizers)") from None
        self._tok = HFTokenizer.from_file(str(path))
        self.name, self.vocab_size = f"hf:{path}", int(self._tok.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """``bytes`` (default), a SentencePiece ``.model`` file or a Hugging Face ``tokenizer.json``."""
    if spec in ("", "bytes"):
        return ByteTokenizer()
    for prefix in ("sentencepiece:", "hf:"):
        spec = spec.removeprefix(prefix)
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"tokenizer file {spec!r} not found (use 'bytes', a .model or a tokenizer.json)")
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)
