"""`nestlm data prepare` on conversational data: peak RSS of a 1 GiB .jsonl against a 10 MiB one.

Writes under a temporary directory a chat tokenizer (a byte-level BPE trained here with a
Qwen3-style template: thinking kept after the last user turn) and two .jsonl files of
conversations (system / user / assistant turns with reasoning_content, some tool calls), of
``--small-mib`` and ``--big-mib`` MiB; prepares each in its own process and prints each
process's peak RSS (VmHWM, polled every 50 ms), its time and throughput, and the ratio (goal:
big / small < 1.2x: preparing streams, so memory does not grow with the corpus). Deletes
everything it wrote.

    .venv/bin/python benchmarks/bench_prepare.py [--big-mib 1024] [--small-mib 10]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = r"""{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role in ['system', 'user'] -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > ns.last_user and m.reasoning_content -%}
{{- '<think>\n' + m.reasoning_content + '\n</think>\n\n' -}}
{%- endif -%}
{{- m.content or '' -}}
{%- for tc in m.tool_calls or [] -%}
{{- '\n<tool_call>\n{"name": "' + tc.function.name + '", "arguments": ' + (tc.function.arguments | tojson) -}}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an are not but we they so "
    "if then therefore number sum add subtract multiply step value result check answer variable equals total "
    "first second next last because which means so we get carry remainder divide twice half minus plus"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def conversation(rng: random.Random) -> dict:
    msgs = [{"role": "system", "content": sentence(rng, 8)}]
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": " ".join(sentence(rng, 12) for _ in range(rng.randint(1, 4)))})
        if rng.random() < 0.3:  # a tool call and its result
            args = {"x": rng.randint(0, 999), "y": rng.randint(0, 999)}
            call = {"type": "function", "function": {"name": "calc", "arguments": args}}
            msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
            msgs.append({"role": "tool", "content": str(args["x"] + args["y"])})
        think = " ".join(sentence(rng, 15) for _ in range(rng.randint(5, 40)))
        msgs.append({"role": "assistant", "reasoning_content": think, "content": sentence(rng, 10)})
    return {"messages": msgs}


def write_jsonl(path: Path, mib: float, seed: int = 0) -> int:
    rng, size, n = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < mib * 2**20:
            line = json.dumps(conversation(rng)) + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
    return n


def chat_tokenizer(path: Path, sample: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with open(sample) as f:
        tok.train_from_iterator((next(f) for _ in range(200)), trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": TEMPLATE}))
    return path


def prepare_rss(data: Path, tok: Path, out: Path) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of a `nestlm data prepare` process on ``data``."""
    cmd = [sys.executable, "-m", "nestlm", "data", "prepare", str(data), "--out", str(out), "--tokenizer", str(tok)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while proc.poll() is None:  # the child's own high-water mark (VmHWM), polled
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(hwm, int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) * 1024)
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"preparing {data} failed: {proc.stderr.read().decode()[-2000:]}")
    return hwm, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=float, default=1024)
    ap.add_argument("--small-mib", type=float, default=10)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nestlm-bench-prepare-", dir="/tmp"))
    try:
        files = {"small": root / "small.jsonl", "big": root / "big.jsonl"}
        records = {name: write_jsonl(p, getattr(a, f"{name}_mib")) for name, p in files.items()}
        tok = chat_tokenizer(root / "tok", files["small"])
        mib, rss = 2.0**-20, {}
        for name, path in files.items():
            rss[name], secs = prepare_rss(path, tok, root / f"prep-{name}")
            meta = json.loads((root / f"prep-{name}" / "shards.json").read_text())
            size = path.stat().st_size
            print(
                f"{name:>5}: {size * mib:7.0f} MiB, {records[name]:,} conversations -> {meta['tokens']:,} tokens, "
                f"{meta['spans']:,} trained spans in {secs:.0f} s ({size * mib / secs:.2f} MiB/s); "
                f"peak RSS {rss[name] * mib:.0f} MiB"
            )
            shutil.rmtree(root / f"prep-{name}")
        r = rss["big"] / rss["small"]
        print(f"RSS big / small: {r:.3f}x (goal < 1.2x: {'met' if r < 1.2 else 'MISSED'})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
