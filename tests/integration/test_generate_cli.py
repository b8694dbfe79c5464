"""`nestlm generate` options: --stop, --draft-budget / --num-draft-tokens, --budget-schedule, --stream,
--prompt-file and escapes in --prompt, on the small elastic checkpoint tests/data/elastic-v1 (budgets full/75/50)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main
from nestlm.cli_generate import unescape
from nestlm.tokenizer import ByteTokenizer

DATA = str(Path(__file__).resolve().parent.parent / "data" / "elastic-v1")
TOK = ByteTokenizer()
SCHEDULE = [{"budget": "50", "max_tokens": 5, "force": "=>"}, {"budget": "full"}]


def gen(capsys: pytest.CaptureFixture, *args: str, prompt: str | None = "x = 1\ny = ") -> str:
    argv = ["generate", "--model", DATA, *(["--prompt", prompt] if prompt is not None else []), *args]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


class Recorder(io.StringIO):
    """sys.stdout that keeps every write and counts the flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.pieces.append(s)
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


def streamed(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[str, list[str], int]:
    rec = Recorder()
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", rec)
        assert main(["generate", "--model", DATA, "--prompt", "x = 1\\ny = ", "--stream", *args]) == 0
    return rec.getvalue(), rec.pieces, rec.flushes


@pytest.fixture(scope="module")
def model() -> nestlm.HybridLM:
    return nestlm.load(DATA).eval()


def reference(model: nestlm.HybridLM, n: int, prompt: str = "x = 1\ny = ", **kw) -> str:
    ids = torch.tensor([TOK.encode(prompt)])
    return TOK.decode(model.generate(ids, max_new_tokens=n, **kw)[0, ids.shape[1] :].tolist())


def test_escapes_in_prompt_and_prompt_file(capsys, tmp_path: Path, monkeypatch, model) -> None:
    assert unescape(r"a\nb\tc\\d\q\\n") == "a\nb\tc\\d\\q\\n"  # \q stays as typed; \\n is a backslash, then n
    want = reference(model, 12) + "\n"
    assert gen(capsys, "--max-new-tokens", "12", prompt="x = 1\\ny = ") == want
    f = tmp_path / "prompt.txt"
    f.write_text("x = 1\ny = ")
    assert gen(capsys, "--max-new-tokens", "12", "--prompt-file", str(f), prompt=None) == want
    f.write_text("x = 1\\ny = ")  # a file is read as it is: no escapes
    assert gen(capsys, "--max-new-tokens", "12", "--prompt-file", str(f), prompt=None) == (
        reference(model, 12, "x = 1\\ny = ") + "\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("x = 1\ny = "))
    assert gen(capsys, "--max-new-tokens", "12", "--prompt-file", "-", prompt=None) == want


def test_stop_cuts_the_output_before_the_first_stop_string(capsys, model) -> None:
    full = reference(model, 40)
    i = next(i for i in range(2, len(full)) if full[i].isascii() and full[i].isprintable() and full[i] != " ")
    stop = full[i]
    cut = full[: full.index(stop)]
    assert gen(capsys, "--max-new-tokens", "40", "--stop", stop) == cut + "\n"
    later = full[full.index(stop) + 1 :]
    j = next(k for k in range(len(later)) if later[k].isascii() and later[k].isprintable() and later[k] not in cut)
    # two stops: the output ends before whichever comes first in it
    first = min(full.index(stop), full.index(later[j]))
    assert gen(capsys, "--max-new-tokens", "40", "--stop", later[j], "--stop", stop) == full[:first] + "\n"
    assert gen(capsys, "--max-new-tokens", "40", "--stop", "\u2603 never") == full + "\n"


def test_draft_budget_is_speculative_decoding_with_the_target_output(capsys, model) -> None:
    want = reference(model, 24, budget="full") + "\n"
    for k in ("1", "3"):
        got = gen(capsys, "--max-new-tokens", "24", "--budget", "full", "--draft-budget", "50", "--num-draft-tokens", k)
        assert got == want
    assert gen(capsys, "--max-new-tokens", "24", "--budget", "full", "--draft-budget", "75") == want


def test_budget_schedule_as_json(capsys, model) -> None:
    want = reference(model, 20, budget_schedule=SCHEDULE, tokenizer=TOK)
    assert want != reference(model, 20)  # the schedule changes the output (50 first, then the forced text)
    assert gen(capsys, "--max-new-tokens", "20", "--budget-schedule", json.dumps(SCHEDULE)) == want + "\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--max-new-tokens", "30"],
        ["--max-new-tokens", "30", "--temperature", "0.9", "--seed", "3"],
        ["--max-new-tokens", "30", "--budget", "75", "--stop", "SEE-TEST"],
        ["--max-new-tokens", "30", "--budget", "full", "--draft-budget", "50", "--num-draft-tokens", "2"],
        ["--max-new-tokens", "20", "--budget-schedule", json.dumps(SCHEDULE)],
    ],
)
def test_stream_prints_as_it_goes_and_ends_with_the_same_text(capsys, monkeypatch, model, args: list[str]) -> None:
    if "SEE-TEST" in args:  # a stop string that occurs in this output, so that the stream must hold back and cut
        full = reference(model, 30, budget="75")
        k = next(i for i in range(5, len(full)) if full[i].isascii() and full[i].isprintable())
        args = [a if a != "SEE-TEST" else full[k] for a in args]
    plain = gen(capsys, *args, prompt="x = 1\\ny = ")
    text, pieces, flushes = streamed(monkeypatch, *args)
    assert text == plain
    assert len(pieces) >= 3 and flushes >= len(pieces) - 1  # printed piece by piece, each flushed


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-draft-tokens", "0", "--draft-budget", "50"], "--num-draft-tokens 0 is out of range: give an integer"),
        (["--num-draft-tokens", "65", "--draft-budget", "50"], "--num-draft-tokens 65 is out of range"),
        (["--num-draft-tokens", "3"], "--num-draft-tokens needs --draft-budget"),
        (["--draft-budget", "60"], "unknown budget '60'"),
        (["--budget-schedule", "[{"], "--budget-schedule is not valid JSON"),
        (["--budget-schedule", "{}"], "--budget-schedule must be a non-empty JSON list of phase objects"),
        (["--budget-schedule", "[]"], "--budget-schedule must be a non-empty JSON list"),
        (["--budget-schedule", '[{"budget": "60"}]'], "--budget-schedule: budget_schedule[0].budget '60' is unknown"),
        (["--budget-schedule", '[{"budget": "50", "max_tokens": 0}]'], "max_tokens must be an integer >= 1"),
        (["--budget-schedule", '[{"budget": "50", "when": 1}]'], "unknown key 'when'"),
        (["--budget-schedule", '[{"budget": "50"}]', "--budget", "full"], "does not combine with --budget"),
        (["--budget-schedule", '[{"budget": "50"}]', "--draft-budget", "50"], "does not combine with --draft-budget"),
        (["--stop", ""], "--stop '' is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt", "NO-PROMPT"], "--prompt-file /nonexistent/prompt.txt is not"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "give exactly one of --prompt TEXT and --prompt-file PATH"),
        (["NO-PROMPT"], "give exactly one of --prompt TEXT and --prompt-file PATH"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is out of range"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(capsys, args: list[str], needle: str) -> None:
    prompt = [] if "NO-PROMPT" in args else ["--prompt", "hi"]
    assert main(["generate", "--model", DATA, *prompt, *[a for a in args if a != "NO-PROMPT"]]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nestlm: error: ") and needle in lines[0], err
    assert out == ""
