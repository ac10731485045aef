"""The checkpoint's tokenizer: ``tokenizer.json`` read with the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """Text <-> token ids with a Hugging Face ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:
            raise ImportError(f"reading {path} needs the 'tokenizers' package: pip install tokenizers") from exc
        self.path = Path(path)
        self._tokenizer = _HFTokenizer.from_file(str(self.path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(checkpoint: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder, or None when it has no ``tokenizer.json``."""
    path = Path(checkpoint) / "tokenizer.json"
    return Tokenizer(path) if path.exists() else None
