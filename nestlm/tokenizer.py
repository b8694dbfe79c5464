"""Tokenizers: the model directory's Hugging Face tokenizer, or bytes for tiny models.

A model directory with ``tokenizer.json`` is read with the ``tokenizers`` library
(never downloaded). ``ByteTokenizer`` maps UTF-8 bytes to ids 3..258 (0 pad, 1 bos,
2 eos) and is what the tiny recipes and tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .errors import NestlmError

BYTE_TOKENIZER_FILE = "nestlm_tokenizer.json"  # {"type": "bytes"}: the model reads UTF-8 bytes


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; 0 = pad, 1 = bos, 2 = eos. Vocabulary 259."""

    vocab_size = 259
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "bytes"}


class HFTokenizer:
    """A ``tokenizer.json`` read with the tokenizers library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.eos_token_id = None
        for name in ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>"):
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eos_token_id = tid
                break
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of many texts at once (the tokenizers library runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(model_dir: str | Path | None, required: bool = True) -> Tokenizer | None:
    """The tokenizer of a model directory: tokenizer.json, else nestlm's byte marker file."""
    if model_dir is not None:
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            return HFTokenizer(d / "tokenizer.json")
        if (d / BYTE_TOKENIZER_FILE).is_file():
            return ByteTokenizer()
    if required:
        raise NestlmError(
            f"no tokenizer in {model_dir} (need tokenizer.json); give pre-tokenized data (.jsonl with input_ids) "
            "or copy the tokenizer files into the model directory"
        )
    return None
