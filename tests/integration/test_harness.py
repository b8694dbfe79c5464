"""lm-evaluation-harness: the ``nestlm`` backend against the harness's own ``hf`` backend, ``nestlm eval --tasks``
per budget against each budget's slice alone, ``nestlm harness`` as the harness's CLI, and the missing-harness error.

The two local tasks (tests/data/harness: YAML with ``dataset_path: json``, data files beside them) run offline;
their data_files are relative, so every harness run here works from that directory.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestlm.cli import main
from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train

pytest.importorskip("lm_eval", reason="the harness is in the dev install (.[eval])")

TASKS = Path(__file__).resolve().parents[1] / "data" / "harness"
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(autouse=True)
def _in_task_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("harness") / "run"
    ov = ["data.max_bytes=60000", "stages.0.steps=4", "stages.1.steps=2"]
    ov += ["elastic.mask=hard", "elastic.budget_loss_weight=1", "elastic.router_init=random"]  # as these were written
    train(load_recipe("tiny", ov), out, progress=False)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


@pytest.fixture(scope="module")
def slices(elastic: Path) -> dict[str, Path]:
    """Every budget cut out and exported in Hugging Face format (tokenizer included)."""
    out = {}
    for b in ("full", "75", "50"):
        out[b] = elastic.parent / f"hf-{b}"
        assert main(["slice", "--model", str(elastic), "--budget", b, "--out", str(out[b]), "--format", "hf"]) == 0
    return out


def _run(model: str, model_args: str, tasks: list[str], limit: int, **kw) -> dict:
    from lm_eval import simple_evaluate

    from nestlm.eval.harness import register
    from nestlm.eval.harness_run import task_manager

    register()
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        limit=limit,
        task_manager=task_manager(tasks, str(TASKS)),
        bootstrap_iters=0,
        log_samples=True,
        batch_size=3,
        device="cpu",
        **kw,
    )


def _responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_nestlm_backend_equals_hf_backend_on_an_export(slices: dict[str, Path], one_thread) -> None:
    from nestlm.eval.harness_run import task_scores

    export = slices["50"]
    tasks = ["nestlm_mc", "nestlm_gen"]
    ours = _run("nestlm", f"path={export}", tasks, limit=6)
    ref = _run("hf", f"pretrained={export},dtype=float32", tasks, limit=6)
    assert task_scores(ours) == task_scores(ref)
    assert set(task_scores(ours)) == {"nestlm_mc/acc", "nestlm_mc/acc_norm", "nestlm_gen/exact_match"}
    mc_ours, mc_ref = _responses(ours, "nestlm_mc"), _responses(ref, "nestlm_mc")
    assert len(mc_ours) == 6 and all(len(r) == 4 for r in mc_ours)  # 6 questions x 4 choices
    for doc_ours, doc_ref in zip(mc_ours, mc_ref, strict=True):
        for (lp, greedy), (lp_ref, greedy_ref) in ((a[0], b[0]) for a, b in zip(doc_ours, doc_ref, strict=True)):
            assert abs(lp - lp_ref) <= 1e-4 and greedy == greedy_ref
    gen_ours, gen_ref = _responses(ours, "nestlm_gen"), _responses(ref, "nestlm_gen")
    assert gen_ours == gen_ref and len(gen_ours) == 6
    assert len({g[0][0] for g in gen_ours}) > 1  # the prompts differ, so do the generations (not all empty)


def test_batching_left_padding_and_stops(slices: dict[str, Path], one_thread) -> None:
    """Batches of 3 (left-padded prompts of different lengths) generate what one prompt at a time does."""
    from lm_eval import simple_evaluate

    from nestlm.eval.harness import NestlmLM
    from nestlm.eval.harness_run import task_manager

    lm1, lm3 = NestlmLM(path=str(slices["full"]), batch_size=1), NestlmLM(path=str(slices["full"]), batch_size=3)
    manager = task_manager(["nestlm_gen"], str(TASKS))
    runs = [
        simple_evaluate(model=lm, tasks=["nestlm_gen"], limit=6, task_manager=manager, bootstrap_iters=0)
        for lm in (lm1, lm3)
    ]
    assert _responses(runs[0], "nestlm_gen") == _responses(runs[1], "nestlm_gen")
    assert all("\n" not in g[0][0] and "." not in g[0][0] for g in _responses(runs[1], "nestlm_gen"))


def test_chat_template_as_the_hf_backend_applies_it(slices: dict[str, Path], one_thread) -> None:
    from nestlm.eval.harness import NestlmLM

    lm = NestlmLM(path=str(slices["75"]))
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]"
    ours = _run("nestlm", f"path={slices['75']}", ["nestlm_gen"], limit=3, apply_chat_template=True)
    ref = _run("hf", f"pretrained={slices['75']},dtype=float32", ["nestlm_gen"], limit=3, apply_chat_template=True)
    assert ours["samples"]["nestlm_gen"][0]["arguments"][0][0].startswith("[user] x = ")
    assert _responses(ours, "nestlm_gen") == _responses(ref, "nestlm_gen")


def test_eval_every_budget_equals_each_slice_alone(
    elastic: Path, slices: dict[str, Path], tmp_path: Path, one_thread
) -> None:
    common = ["--tasks", "nestlm_mc,nestlm_gen", "--include-path", str(TASKS), "--limit", "5", "--data", "none"]
    assert main(["eval", "--model", str(elastic), "--budget", "all", "--out", str(tmp_path / "all"), *common]) == 0
    report = json.loads((tmp_path / "all" / "eval.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "75", "50"] and report["tasks"] == ["nestlm_mc", "nestlm_gen"]
    for b, path in slices.items():
        assert main(["eval", "--model", str(path), "--out", str(tmp_path / b), *common]) == 0
        alone = json.loads((tmp_path / b / "eval.json").read_text())["rows"]
        assert [r["name"] for r in alone] == ["model"] and alone[0]["params"] == rows[b]["params"]
        assert alone[0]["tasks"] == rows[b]["tasks"], b
        assert set(alone[0]["tasks"]) == {"nestlm_mc/acc", "nestlm_mc/acc_norm", "nestlm_gen/exact_match"}
    md = (tmp_path / "all" / "report.md").read_text()
    assert "| nestlm_mc/acc | nestlm_mc/acc_norm | nestlm_gen/exact_match |" in md
    assert (tmp_path / "all" / "quality.png").stat().st_size > 1000


@pytest.fixture
def local_tasks_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The harness CLI indexes its thousands of built-in task files (a minute on 2 cores); here only the local ones."""
    from lm_eval.tasks import manager

    init = manager.TaskManager.__init__
    monkeypatch.setattr(manager.TaskManager, "__init__", functools.partialmethod(init, include_defaults=False))
    yield
    # the harness CLI logs to the stderr of its first call (a capture pytest closes); start afresh next time
    import logging

    import lm_eval.utils

    logging.getLogger("lm_eval").handlers.clear()
    lm_eval.utils._LOGGING_CONFIGURED = False


def test_harness_command_prints_the_harness_table(
    slices: dict[str, Path], local_tasks_only, capsys: pytest.CaptureFixture, one_thread
) -> None:
    args = ["--tasks", "nestlm_mc", "--include_path", str(TASKS), "--limit", "3", "--batch_size", "3"]
    assert main(["harness", "--model", "nestlm", "--model_args", f"path={slices['50']},budget=full", *args]) == 0
    out = capsys.readouterr().out
    assert "nestlm ({'path': " in out and "'budget': 'full'" in out  # the harness's header line
    assert "|nestlm_mc|" in out.replace(" ", "") and "|acc_norm|" in out.replace(" ", "")  # and its table
    # the harness's own backends still work in the same process (registered after them, not instead)
    assert main(["harness", "--model", "hf", "--model_args", f"pretrained={slices['50']}", *args]) == 0
    assert "|nestlm_mc|" in capsys.readouterr().out.replace(" ", "")


def test_harness_budget_on_the_elastic_checkpoint(
    elastic: Path, slices: dict[str, Path], local_tasks_only, one_thread
) -> None:
    """budget=NAME in model_args runs that budget in place: the same loglikelihoods as its export."""
    at_budget = _run("nestlm", f"path={elastic},budget=75", ["nestlm_mc"], limit=4)
    export = _run("nestlm", f"path={slices['75']}", ["nestlm_mc"], limit=4)
    full = _run("nestlm", f"path={elastic}", ["nestlm_mc"], limit=4)
    a, b, c = (_responses(r, "nestlm_mc") for r in (at_budget, export, full))
    flat = [
        (x[0][0], y[0][0], z[0][0])
        for da, db, dc in zip(a, b, c, strict=True)
        for x, y, z in zip(da, db, dc, strict=True)
    ]
    assert all(abs(x - y) <= 1e-4 for x, y, _ in flat)
    assert max(abs(x - z) for x, _, z in flat) > 1e-3  # and it is not the full model


def _err(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nestlm: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input(elastic: Path, tmp_path: Path, local_tasks_only, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    base = ["eval", "--model", str(elastic), "--data", "none", "--out", str(out), "--include-path", str(TASKS)]
    assert "unknown task nope" in _err(capsys, [*base, "--tasks", "nestlm_mc,nope"])
    assert "unknown budget '7b'" in _err(capsys, [*base, "--tasks", "nestlm_mc", "--budget", "7b"])
    assert "--limit must be > 0" in _err(capsys, [*base, "--tasks", "nestlm_mc", "--limit", "0"])
    err = _err(capsys, ["eval", "--model", str(elastic), "--tasks", "x", "--include-path", str(tmp_path / "no")])
    assert "is not a directory" in err
    assert not out.exists()
    harness = ["harness", "--model", "nestlm", "--tasks", "nestlm_mc", "--include_path", str(TASKS), "--limit", "1"]
    for model_args, msg in (
        (f"path={elastic},budget=7b", "unknown budget '7b'; known budgets: full, 75, 50"),
        (f"path={elastic},colour=red", "unknown model_args colour"),
        (f"path={tmp_path / 'none'}", "does not exist"),
    ):
        assert main([*harness, "--model_args", model_args]) == 2
        err = capsys.readouterr().err.strip()  # the harness's own log lines, then nestlm's one-line error
        assert err.splitlines()[-1].startswith("nestlm: error:") and msg in err.splitlines()[-1]
        assert "Traceback" not in err


def test_a_missing_harness_is_one_line(
    elastic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.delitem(sys.modules, "nestlm.eval.harness", raising=False)
    monkeypatch.delitem(sys.modules, "nestlm.eval.harness_run", raising=False)
    err = _err(capsys, ["eval", "--model", str(elastic), "--tasks", "nestlm_mc", "--out", str(tmp_path / "o")])
    assert 'pip install -e ".[eval]"' in err and not (tmp_path / "o").exists()
    assert 'pip install -e ".[eval]"' in _err(capsys, ["harness", "--model", "nestlm", "--tasks", "x"])


def test_rolling_loglikelihood_equals_hf_backend(tmp_path: Path, one_thread) -> None:
    """Whole-text scores in several windows (max_length 16): the same windows and sums as the hf backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import nestlm
    from nestlm.eval.harness import NestlmLM

    export = tmp_path / "parent-hf"
    nestlm.export_hf(nestlm.load(Path(nestlm.__file__).parent / "assets" / "parent"), export)
    texts = ["x = 3\nx = x + 4\nx = 7\n", "The quick brown fox jumps over the lazy dog. " * 3, "h\u00e9llo \u20ac"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = NestlmLM(path=str(export), max_length=16, batch_size=2).loglikelihood_rolling(reqs, disable_tqdm=True)
    ref = HFLM(pretrained=str(export), max_length=16, batch_size=2, device="cpu", dtype="float32")
    ref = ref.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(ours) == 3 and all(abs(a - b) <= 1e-4 for a, b in zip(ours, ref, strict=True)), (ours, ref)
    assert ours[1] < ours[0] < 0  # the long text spans many windows


def test_server_scored_by_local_completions_equals_nestlm_backend(slices: dict[str, Path], one_thread) -> None:
    """A real client of our API: the harness's own ``local-completions`` backend scores the
    multiple-choice task through ``nestlm serve`` with the loglikelihoods of the in-process backend."""
    from nestlm.serve.server import build_api
    from tests.integration.serving import Server

    export = slices["50"]
    server = Server(build_api(export, max_context=512))
    try:
        (name,) = [m.id for m in server.client().models.list()]
        args = (
            f"base_url={server.url}/v1/completions,model={name},tokenizer_backend=huggingface,"
            f"tokenizer={export},num_concurrent=1,max_retries=1,tokenized_requests=True"
        )
        via_server = _run("local-completions", args, ["nestlm_mc"], limit=6)
    finally:
        server.close()
    ours = _run("nestlm", f"path={export}", ["nestlm_mc"], limit=6)
    a, b = _responses(via_server, "nestlm_mc"), _responses(ours, "nestlm_mc")
    assert len(a) == 6 and all(len(r) == 4 for r in a)
    for doc_a, doc_b in zip(a, b, strict=True):
        for (lp, greedy), (lp_ref, greedy_ref) in ((x[0], y[0]) for x, y in zip(doc_a, doc_b, strict=True)):
            assert abs(lp - lp_ref) <= 1e-4 and greedy == greedy_ref
