"""Tokenizers: the model directory's Hugging Face tokenizer, or bytes for tiny models.

A model directory with ``tokenizer.json`` is read with the ``tokenizers`` library
(never downloaded). ``ByteTokenizer`` maps UTF-8 bytes to ids 3..258 (0 pad, 1 bos,
2 eos) and is what the tiny recipes and tests use.

``write_hf_tokenizer`` gives a model directory a tokenizer that transformers'
``AutoTokenizer`` loads: the source's own Hugging Face files, or for the byte-level
tokenizer a ``tokenizer.json`` built with the tokenizers library that encodes and
decodes exactly as ``ByteTokenizer`` does, ids included.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

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


# ---- Hugging Face tokenizer files (for export_hf, the harness and chat templates) ----------------

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of ByteTokenizer
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, the table of byte-level BPE (GPT-2) that the ByteLevel pre-tokenizer uses."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_level_tokenizer() -> Any:
    """A tokenizers ``Tokenizer`` equal to ``ByteTokenizer``: byte b -> id b + 3; <pad> 0, <s> 1, </s> 2.

    A byte-level BPE with no merges, so every byte is one token; no normalizer, no prefix
    space, no post-processor (nothing is added around the text, as ByteTokenizer adds nothing).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {name: i for i, name in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({ch: b + 3 for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
    return tok


def chat_template_of(src: str | os.PathLike | None) -> str | None:
    """The chat template of a model directory, as transformers reads it: chat_template.jinja first, else
    tokenizer_config.json's ``chat_template`` (a string, or named templates: the "default" one); None if none."""
    if src is None:
        return None
    src = Path(src)
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text()
    cfg = src / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        t = json.loads(cfg.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def byte_tokenizer_config(chat_template: str | None = None, model_max_length: int | None = None) -> dict[str, Any]:
    """tokenizer_config.json of the byte-level tokenizer.

    ``split_special_tokens``: text is always bytes, as in ByteTokenizer, so a literal "</s>"
    in a prompt is five byte tokens, never the EOS id.
    """
    pad, bos, eos = BYTE_SPECIAL_TOKENS
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def is_byte_level(model_dir: str | os.PathLike | None) -> bool:
    """A directory whose tokenizer is nestlm's byte marker file (and no tokenizer.json)."""
    if model_dir is None:
        return False
    d = Path(model_dir)
    return (d / "nestlm_tokenizer.json").is_file() and not (d / "tokenizer.json").is_file()


def write_hf_tokenizer(src: str | os.PathLike | None, dst: str | os.PathLike) -> bool:
    """Give ``dst`` a tokenizer that transformers' AutoTokenizer loads; False when ``src`` has none.

    A source with Hugging Face tokenizer files has them copied; a byte-level source gets a
    ``tokenizer.json`` equal to ByteTokenizer and a ``tokenizer_config.json`` (EOS, BOS, pad,
    and the source's chat template where it has one).
    """
    if src is None:
        return False
    src, dst = Path(src), Path(dst)
    if is_byte_level(src):
        byte_level_tokenizer().save(str(dst / "tokenizer.json"))
        (dst / "tokenizer_config.json").write_text(
            json.dumps(byte_tokenizer_config(chat_template_of(src)), indent=2) + "\n"
        )
        return True
    copied = False
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied = True
    return copied


def load_hf_tokenizer(model_dir: str | os.PathLike) -> Any:
    """transformers' tokenizer for a model directory, byte-level ones included (built in memory, nothing written)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = Path(model_dir)
    if is_byte_level(d):
        cfg = byte_tokenizer_config(chat_template_of(d))
        cfg.pop("tokenizer_class")
        return PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), **cfg)
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        raise NestlmError(f"no tokenizer in {d} (need tokenizer.json, or nestlm_tokenizer.json for bytes)")
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for malformed files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NestlmError(f"transformers cannot load the tokenizer in {d}: {msg}") from None
