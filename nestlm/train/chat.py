"""Conversations and prompt/completion records -> token ids, and the spans of tokens trained on.

The chat template renders every conversation: the tokenizer directory's ``chat_template.jinja`` or
``tokenizer_config.json`` (``data.chat_template: PATH`` overrides it), through transformers'
``apply_chat_template``. What the template renders is what the model trains on, thinking blocks
(``reasoning_content``, ``<think>``) kept or dropped as the template does.

Which tokens are trained (``data.loss``): ``completion``, every assistant turn; ``last_turn``, the
last one; ``all``, every token. A turn is located in the rendered conversation itself, so that a
template rendering earlier turns differently (Qwen3 drops their thinking) cannot shift the mask:
the conversation is rendered again with that turn's content replaced by a sentinel, and the turn
is where the two renderings differ, widened back to its header (the template's generation
prompt, which stays untrained) and on to its end-of-turn token (trained: the model must learn to
stop). A token is trained when its first character lies in a trained turn.

Prompt/completion pairs (TRL): two strings are tokenized apart and joined, EOS after the
completion (trained: the completion and EOS); two lists of messages are one conversation whose
assistant turns within the completion are trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NestlmError
from .records import Record

ROLES = ("system", "user", "assistant", "tool")
LOSSES = ("all", "completion", "last_turn")
SENTINEL = "\u27e6nestlm-turn\u27e7"

Span = tuple[int, int, bool]  # [start, end) in tokens, and whether it is the record's last trained turn


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality: C-speed comparisons, O(n log n)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def _common_suffix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[len(a) - mid :] == b[len(b) - mid :] else (lo, mid - 1)
    return lo


class ChatFormat:
    """Records of one tokenizer as (ids, spans); see the module doc.

    ``tokenizer``: "bytes" or a directory with Hugging Face tokenizer files; ``template``: a file
    holding a Jinja chat template (or a tokenizer_config.json with one), instead of the directory's.
    Nothing is loaded until a record needs it (text data never imports transformers).
    """

    def __init__(self, tokenizer: str | Path, template: str | Path | None = None) -> None:
        self.tokenizer, self.template_path = str(tokenizer), template
        self._hf: Any = None
        self._template: str | None = None

    # ------------------------------------------------------------ loading
    @property
    def hf(self) -> Any:
        """transformers' tokenizer (byte-level ones built in memory)."""
        if self._hf is None:
            from ..tokenizer import byte_level_tokenizer, byte_tokenizer_config, load_hf_tokenizer

            if self.tokenizer == "bytes":
                from transformers import PreTrainedTokenizerFast

                cfg = byte_tokenizer_config()
                cfg.pop("tokenizer_class")
                self._hf = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), **cfg)
            else:
                self._hf = load_hf_tokenizer(self.tokenizer)
        return self._hf

    def template(self, where: str) -> str:
        """The chat template, or one line saying there is none (naming the record that needs it)."""
        if self._template is None:
            if self.template_path is not None:
                p = Path(self.template_path)
                try:
                    text = p.read_text(encoding="utf-8")
                    if p.suffix == ".json":  # a tokenizer_config.json
                        text = (json.loads(text) or {}).get("chat_template")
                except (OSError, ValueError, AttributeError) as e:
                    why = getattr(e, "strerror", None) or e
                    raise NestlmError(f"data.chat_template {p} cannot be read: {why}") from None
                self._template = text if isinstance(text, str) and text.strip() else None
                if self._template is None:
                    raise NestlmError(f"data.chat_template {p} holds no chat template")
            else:
                self._template = self.hf.chat_template
            if not isinstance(self._template, str):
                self._template = None
                raise NestlmError(
                    f"{where} is a conversation, and the tokenizer {self.tokenizer} has no chat template to render it; "
                    "give data.chat_template: PATH (a Jinja file), or a tokenizer whose directory has one"
                )
            try:
                self.header, self.eot = self._markers(where)
            except NestlmError:
                self._template = None
                raise
        return self._template

    def _render(self, messages: list[dict], tools: Any, where: str, generation: bool = False) -> str:
        try:
            return self.hf.apply_chat_template(
                messages,
                tools=tools or None,
                chat_template=self.template(where),
                tokenize=False,
                add_generation_prompt=generation,
            )
        except NestlmError:
            raise
        except Exception as e:  # jinja raises template errors (raise_exception) as many kinds
            raise NestlmError(f"{where}: the chat template cannot render it ({_first_line(e)})") from None

    def _markers(self, where: str) -> tuple[str, str]:
        """The assistant header (the generation prompt) and end-of-turn text, read off two probe renderings."""
        user = [{"role": "user", "content": "hi"}]
        plain, prompted = self._render(user, None, where), self._render(user, None, where, generation=True)
        if not prompted.startswith(plain) or prompted == plain:
            raise NestlmError(
                "the chat template adds no generation prompt, so nestlm cannot tell where an assistant turn "
                "starts; give data.loss: all, or another data.chat_template"
            )
        full = self._render(user + [{"role": "assistant", "content": SENTINEL}], None, where)
        tail = full[full.index(SENTINEL) + len(SENTINEL) :] if SENTINEL in full else ""
        hf = self.hf
        specials = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values() if t.special}
        hits = [(tail.find(t), -len(t), t) for t in specials if t and t in tail]
        eot = tail[: min(hits)[0] + len(min(hits)[2])] if hits else tail  # up to the first special token
        return prompted[len(plain) :], eot

    # ------------------------------------------------------------ records
    def _messages(self, value: Any, where: str, name: str) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise NestlmError(f"{where}: {name!r} must be a non-empty list of messages")
        out = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise NestlmError(f"{where}: message {k} of {name!r} is not an object with a 'role'")
            if m["role"] not in ROLES:
                raise NestlmError(f"{where}: unknown role {m['role']!r} in message {k} (roles: {', '.join(ROLES)})")
            out.append({key: v for key, v in m.items() if v is not None})  # tables fill absent fields with None
        return out

    def _turn(self, msgs: list[dict], i: int, text: str, prev: int, tools: Any, where: str) -> tuple[int, int]:
        """Characters [start, end) of assistant turn ``i`` in ``text``, the rendering of ``msgs``."""
        alt = list(msgs)
        alt[i] = {k: v for k, v in msgs[i].items() if k not in ("reasoning_content", "thinking")}
        alt[i]["content"] = SENTINEL
        other = self._render(alt, tools, where)
        a = _common_prefix(text, other)
        content_end = len(text) - _common_suffix(text[a:], other[a:])
        headers = [self.header] + ([self.header.split("<think>")[0]] if "<think>" in self.header else [])
        for h in headers:
            start = text.rfind(h, prev, a)
            if start >= 0:
                break
        end = text.find(self.eot, content_end) if start >= 0 else -1
        if start < 0 or end < 0:
            raise NestlmError(
                f"{where}: cannot find assistant turn {i} (its header {self.header!r} and end {self.eot!r}) in the "
                "rendered conversation; give data.loss: all, or another data.chat_template"
            )
        return start + len(h), end + len(self.eot)

    def _tokens(self, text: str, spans: list[tuple[int, int, bool]]) -> tuple[torch.Tensor, list[Span]]:
        if getattr(self.hf, "split_special_tokens", False):  # byte-level: a "</s>" in the text is its bytes
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        else:  # the same ids through the Rust tokenizer directly (transformers' call costs more than encoding)
            enc = self.hf.backend_tokenizer.encode(text, add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
        starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(ids))
        tok = [(int(np.searchsorted(starts, s)), int(np.searchsorted(starts, e)), last) for s, e, last in spans]
        return torch.tensor(ids, dtype=torch.long), tok

    def encode(self, rec: Record, loss: str = "completion") -> tuple[torch.Tensor, list[Span]]:
        """Token ids of a record and its trained spans (every assistant turn; the last only for
        ``last_turn``; none for ``all``, which trains every token)."""
        d, where = rec.data, rec.where
        if rec.kind == "prompt_completion" and isinstance(d["prompt"], str) and isinstance(d["completion"], str):
            p, c = (self.hf(t, add_special_tokens=False)["input_ids"] for t in (d["prompt"], d["completion"]))
            eos = [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]
            ids = torch.tensor(p + c + eos, dtype=torch.long)
            return ids, [(len(p), ids.numel(), True)]
        if rec.kind == "messages":
            msgs, first = self._messages(d["messages"], where, "messages"), 0
        elif isinstance(d["prompt"], list) and isinstance(d["completion"], list):
            prompt = self._messages(d["prompt"], where, "prompt")
            msgs, first = prompt + self._messages(d["completion"], where, "completion"), len(prompt)
        else:
            raise NestlmError(f"{where}: 'prompt' and 'completion' must be two strings or two lists of messages")
        text = self._render(msgs, d.get("tools"), where)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= first]
        if loss != "all" and not turns:
            what = "the completion" if first else "the conversation"
            raise NestlmError(
                f"{where}: {what} has no assistant turn, nothing to train on under data.loss: {loss} "
                "(give data.loss: all, or leave the record out)"
            )
        spans, prev = [], 0
        for i in [] if loss == "all" else turns[-1:] if loss == "last_turn" else turns:
            s, e = self._turn(msgs, i, text, prev, d.get("tools"), where)
            spans.append((s, e, i == turns[-1]))
            prev = e
        return self._tokens(text, spans)


def trained_mask(n: int, spans: list[Span], loss: str) -> torch.Tensor:
    """(n,) bool: the tokens ``loss`` trains on, from a record's spans ("all": every token)."""
    if loss == "all":
        return torch.ones(n, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    for s, e, last in spans:
        if loss != "last_turn" or last:
            mask[s:e] = True
    return mask
