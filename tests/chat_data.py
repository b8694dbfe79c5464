"""A chat tokenizer built locally (a small byte-level BPE trained with ``tokenizers``, a Qwen3-style
template) and conversations whose trained text is written out by hand, to check masks against."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3's conventions: <|im_start|>ROLE ... <|im_end|>; an assistant turn's thinking is kept only after
# the last user message (earlier turns lose it); <think> inside the content is split out the same way;
# tool results are user turns holding <tool_response>.
TEMPLATE = r"""{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role in ['system', 'user'] -%}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > ns.last_user and reasoning -%}{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}{%- endif -%}
{{- content -}}
{%- for tc in m.tool_calls or [] -%}
{{- '\n<tool_call>\n{"name": "' + tc.function.name + '", "arguments": ' -}}
{{- (tc.function.arguments | tojson) + '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# (record, the text trained under data.loss: completion, under last_turn)
CONVERSATIONS = [
    (
        {"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "reasoning_content": "Two plus two is four.", "content": "The answer is 4."},
        ]},
        "<think>\nTwo plus two is four.\n</think>\n\nThe answer is 4.<|im_end|>",
        None,  # the same
    ),
    (  # the first turn's thinking is dropped once a later user turn follows: the mask must not shift
        {"messages": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "reasoning_content": "They greet me.", "content": "Hi! How can I help?"},
            {"role": "user", "content": "How are you today?"},
            {"role": "assistant", "content": "<think>\nA polite question.\n</think>\n\nWell, thank you."},
        ]},
        "Hi! How can I help?<|im_end|><think>\nA polite question.\n</think>\n\nWell, thank you.<|im_end|>",
        "<think>\nA polite question.\n</think>\n\nWell, thank you.<|im_end|>",
    ),
    (  # a tool call and its result: both assistant turns keep their thinking (no user turn after them)
        {"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning_content": "I need the tool.", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21C"},
            {"role": "assistant", "reasoning_content": "It is sunny.", "content": "Sunny and 21C in Paris."},
        ]},
        '<think>\nI need the tool.\n</think>\n\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|><think>\nIt is sunny.\n</think>\n\nSunny and 21C in Paris.<|im_end|>",
        "<think>\nIt is sunny.\n</think>\n\nSunny and 21C in Paris.<|im_end|>",
    ),
]  # fmt: skip

# TRL prompt/completion, conversational (a Parquet table of message lists) and plain strings
PC_CONVERSATIONAL = [
    ({"prompt": [{"role": "user", "content": "Name a color."}],
      "completion": [{"role": "assistant", "content": "Blue."}]}, "Blue.<|im_end|>"),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}],
      "completion": [{"role": "assistant", "content": "Rome."}]}, "Rome.<|im_end|>"),
]  # fmt: skip
PC_PLAIN = [({"prompt": "Q: 2+3 = ?", "completion": " A: 5"}, " A: 5<|im_end|>")]  # EOS after a plain completion


def corpus() -> list[str]:
    texts = [json.dumps(r) for r, *_ in CONVERSATIONS + PC_CONVERSATIONAL + PC_PLAIN]
    return texts + ["the answer is four, thinking about the weather in paris and rome"] * 4


def chat_tokenizer(path: Path, template: bool = True, vocab: int = 320) -> Path:
    """A directory with tokenizer.json (a byte-level BPE trained here) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template:
        cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def write_jsonl(path: Path, records: list[dict], repeat: int = 1) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for _ in range(repeat) for r in records))
    return path


def write_parquet(path: Path, records: list[dict], repeat: int = 1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for _ in range(repeat) for r in records]
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)
    return path
