"""A new user's first hour: the small cuts of the CLI and the Python API, each pinned by a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main

DATA = Path(__file__).resolve().parent.parent / "data" / "elastic-v1"


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"nestlm {version('nestlm')}"


def test_a_budget_named_by_a_number_is_that_budget() -> None:
    """budget=50 is the budget named "50" (the error used to say: unknown budget 50; known budgets: ... 50)."""
    model = nestlm.load(DATA).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids, budget=50).logits, model(ids, budget="50").logits)
    assert model.num_parameters(budget=75) == model.num_parameters(budget="75")
    assert model.slice(50).num_parameters() == model.num_parameters(budget="50")
    assert torch.equal(
        model.generate(ids, max_new_tokens=3, budget=50), model.generate(ids, max_new_tokens=3, budget="50")
    )
    with pytest.raises(nestlm.UnknownBudgetError, match="unknown budget '60'"):
        model(ids, budget=60)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--max-new-tokens", "-5", "--max-new-tokens -5 is out of range: give an integer >= 1"),
        ("--temperature", "-1", "--temperature -1.0 is out of range"),
        ("--top-p", "0", "--top-p 0.0 is out of range: give in (0, 1]"),
        ("--top-k", "0", "--top-k 0 is out of range"),
    ],
)
def test_generate_refuses_out_of_range_options(capsys: pytest.CaptureFixture, option: str, value: str, needle: str):
    """One line, exit 2, before the model is even loaded (a missing --model directory is not reached)."""
    argv = ["generate", "--model", "/nonexistent/model", "--prompt", "x = ", option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nestlm: error: ") and needle in err[0], err


def test_budget_targets_take_the_names_budgets_have() -> None:
    """`prune --budget 6b` as the README names budgets: 6e9 parameters (500m, 1.5k likewise)."""
    from nestlm.elastic.targets import Target

    assert nestlm.parse_target("6b") == nestlm.parse_target("6e9") == Target("params", 6e9)
    assert nestlm.parse_target("500M") == Target("params", 5e8)
    assert nestlm.parse_target("23b,active=2.8b") == Target("params", 23e9, 2.8e9)
    assert nestlm.parse_target("12GB").kind == "memory"  # a memory size is still one
    with pytest.raises(nestlm.NestlmError, match="6x"):
        nestlm.parse_target("6x")


def test_a_recipe_with_both_a_path_and_an_init_says_how_to_fix_it(capsys: pytest.CaptureFixture, tmp_path) -> None:
    parent = Path(nestlm.__file__).parent / "assets" / "parent"
    assert main(["train", "tiny", "--out", str(tmp_path / "r"), f"model.path={parent}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init=null" in err[0]
    assert (
        main(["train", "tiny", "--out", str(tmp_path / "r"), f"model.path={parent}", "model.init=null", "--dry-run"])
        == 0
    )
    assert not (tmp_path / "r").exists()


def test_text_to_ids_with_the_models_tokenizer() -> None:
    parent = Path(nestlm.__file__).parent / "assets" / "parent"
    tok = nestlm.load_tokenizer(parent)
    ids = tok.encode("x = 1")
    assert tok.decode(ids) == "x = 1" and len(ids) == 5


FAST = ["data.max_bytes=60000", "stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=2"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=-1", "train.lr = -1.0 must be > 0"),
        ("stages.0.steps=-3", "stages.0.steps (stage 'short') = -3 must be >= 0"),
        ("train.betas=[0.9,1.5]", "train.betas = [0.9, 1.5] must be two numbers in [0, 1)"),
        ("elastic.tolerance=2", "elastic.tolerance = 2.0 must be in [0, 1]"),
        ("data.val_fraction=1", "data.val_fraction = 1.0 must be in [0, 1)"),
    ],
)
def test_a_recipe_value_out_of_range_is_one_line_before_any_write(
    capsys: pytest.CaptureFixture, tmp_path: Path, override: str, needle: str
) -> None:
    """train.lr=-1 used to end in torch's traceback after the run directory was begun; stages.0.steps=-3 skipped."""
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "--no-progress", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_start_that_never_reached_a_checkpoint_runs_again_without_resume(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the run directory was begun (before any checkpoint): the same command starts it again."""
    from nestlm.train import trainer

    out = tmp_path / "run"
    real_run = trainer.Trainer.run

    def interrupted(self: trainer.Trainer) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "run", interrupted)
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *FAST]) == 130
    assert (out / "run.json").is_file() and not (out / "checkpoints").exists()
    code = main(["train", "tiny", "--out", str(out), "--no-progress", "--resume", *FAST])
    assert code == 2 and "no complete checkpoint yet; start again without --resume" in capsys.readouterr().err
    monkeypatch.setattr(trainer.Trainer, "run", real_run)
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *FAST]) == 0
    assert "starting it again" in capsys.readouterr().out
    assert (out / "checkpoints").is_dir() and (out / "model.safetensors").is_file()


def test_a_failed_start_next_to_a_file_of_the_user_is_not_cleared(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """Only what a start writes is ever removed: a directory holding anything else is refused, untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"fingerprint": "x", "recipe": {}}')
    (out / "notes.txt").write_text("mine")
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *FAST]) == 2
    assert "already holds a different run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]


def test_ctrl_c_inside_a_sharded_checkpoint_write_is_an_interrupt_not_an_io_error() -> None:
    """torch.distributed.checkpoint wraps a rank's KeyboardInterrupt in a CheckpointException."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from nestlm.errors import OutputError
    from nestlm.outputs import writing

    with pytest.raises(KeyboardInterrupt), writing("/tmp/x"):
        raise CheckpointException("save failed", {0: (KeyboardInterrupt(), traceback.StackSummary())})
    full = OSError(28, "No space left on device", "/tmp/x/shard.distcp")
    with pytest.raises(OutputError, match=r"cannot write /tmp/x/shard.distcp: No space left on device \(ENOSPC\)"):
        with writing("/tmp/x"):
            raise CheckpointException("save failed", {0: (full, traceback.StackSummary())})


def test_eval_reads_a_prepared_directory_as_train_does(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`eval --data DIR` with DIR from `nestlm data prepare`: the same perplexity as on the text it was made from."""
    import json

    text = tmp_path / "held-out.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", str(text), "--out", str(prepared), "--tokenizer", "bytes"]) == 0
    losses = {}
    for name, data in (("text", text), ("prepared", prepared)):
        out = tmp_path / f"eval-{name}"
        argv = [
            "eval",
            "--model",
            str(DATA),
            "--budget",
            "50",
            "--data",
            str(data),
            "--out",
            str(out),
            "--seq-len",
            "64",
        ]
        assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
        losses[name] = json.loads((out / "eval.json").read_text())["rows"][0]["loss"]
    assert losses["prepared"] == pytest.approx(losses["text"], rel=1e-6)


def test_eval_reports_the_problem_count_and_interval_and_never_replaces_a_report_unasked(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import json

    from nestlm.cli import build_parser
    from nestlm.eval.stats import wilson_interval

    assert build_parser().parse_args(["eval", "--model", "m"]).num_reasoning == 200  # as the README's tables
    out = tmp_path / "e"
    argv = ["eval", "--model", str(DATA), "--budget", "50", "--out", str(out), "--no-progress"]
    assert main([*argv, "--num-reasoning", "8", "--num-problems", "20"]) == 0
    row = json.loads((out / "eval.json").read_text())["rows"][0]
    assert row["accuracy_n"] == 8 and len(row["correct"]) == 8
    assert row["accuracy_ci"] == pytest.approx(list(wilson_interval(sum(row["correct"]), 8)))
    table = capsys.readouterr().out
    assert "95% interval" in table and "problems" in table
    assert main([*argv, "--num-reasoning", "0"]) == 2
    assert "--num-reasoning 0 is out of range: give an integer >= 1" in capsys.readouterr().err


def test_train_help_names_every_shipped_recipe(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from nestlm.train.recipe import shipped_recipes

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens otherwise
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert len(shipped_recipes()) >= 7
    for name in shipped_recipes():
        assert name in text, name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["importance", "--data", "reasoning:short", "--seq-len", "0"],
            "--seq-len 0 is out of range: give an integer >= 2",
        ),
        (["importance", "--data", "reasoning:short", "--num-samples", "-2"], "--num-samples -2 is out of range"),
        (
            ["prune", "--budget", "0.5", "--tolerance", "1.5"],
            "--tolerance 1.5 is out of range: give a fraction in [0, 1)",
        ),
        (["data", "show", "reasoning:short", "--tokenizer", "bytes", "--rows", "0"], "--rows 0 is out of range"),
        (["eval", "--batch-size", "0"], "--batch-size 0 is out of range: give an integer >= 1"),
    ],
)
def test_every_numeric_option_is_checked_before_any_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str], needle: str
) -> None:
    """`importance --seq-len 0` used to end in a ZeroDivisionError traceback, `--num-samples -2` in torch's."""
    extra = ["--model", str(DATA)] if argv[0] != "data" else []
    extra += ["--out", str(tmp_path / "out")] if argv[0] in ("importance", "prune", "eval") else []
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()
