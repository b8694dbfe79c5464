"""Running the harness's tasks through the ``nestlm`` backend: ``simple_evaluate`` at each budget of
one loaded model (``nestlm eval --tasks``), the task manager, and the flat scores of a results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import NestlmError
from .harness import NestlmLM, register


def evaluate(
    lm: NestlmLM,
    tasks: list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    apply_chat_template: bool = False,
    seed: int = 0,
    manager: Any = None,
) -> dict[str, Any]:
    """``simple_evaluate`` of ``lm`` (at its current budget) on ``tasks``; the harness's results dict."""
    from lm_eval import simple_evaluate

    register()
    if manager is None:
        manager = task_manager(tasks, include_path)
    if limit is not None and limit >= 1:
        limit = int(limit)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


class TaskRunner:
    """``nestlm eval --tasks``: the harness's tasks at every budget of one loaded model."""

    def __init__(
        self,
        tasks: list[str],
        limit: float | None = None,
        num_fewshot: int | None = None,
        include_path: str | None = None,
        apply_chat_template: bool = False,
        batch_size: int = 8,
    ) -> None:
        if not tasks:
            raise NestlmError("--tasks is empty; give task names, comma-separated")
        if limit is not None and limit <= 0:
            raise NestlmError(f"--limit must be > 0, got {limit}")
        if num_fewshot is not None and num_fewshot < 0:
            raise NestlmError(f"--num-fewshot must be >= 0, got {num_fewshot}")
        self.tasks, self.limit, self.num_fewshot = tasks, limit, num_fewshot
        self.include_path, self.apply_chat_template, self.batch_size = include_path, apply_chat_template, batch_size
        self.manager = task_manager(tasks, include_path)
        self.lm: NestlmLM | None = None

    @classmethod
    def from_args(cls, args: Any) -> TaskRunner:
        return cls(
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
            apply_chat_template=args.apply_chat_template,
            batch_size=args.batch_size,
        )

    def scores(self, model: Any, model_dir: str, budget: str | None) -> dict[str, float]:
        """``task/metric`` -> score of ``model`` at ``budget`` (the same weights for every budget: no reload)."""
        if self.lm is None:
            self.lm = NestlmLM(model=model, path=model_dir, batch_size=self.batch_size)
        self.lm.set_budget(budget)
        results = evaluate(
            self.lm,
            self.tasks,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            apply_chat_template=self.apply_chat_template,
            manager=self.manager,
        )
        return task_scores(results)

    def describe(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "limit": self.limit, "num_fewshot": self.num_fewshot}


def task_manager(tasks: list[str], include_path: str | None = None) -> Any:
    """A TaskManager that knows ``tasks``: the include path's alone when it holds them all (indexing the
    harness's thousands of built-in YAML files takes a minute), else the built-in ones too."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise NestlmError(f"--include-path {include_path} is not a directory of task YAML files")
    wanted = [t for t in tasks if not t.endswith(".yaml")]
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in wanted):
            return local
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in wanted if t not in manager.all_tasks]
    if unknown:
        raise NestlmError(
            f"unknown task {', '.join(unknown)}; `nestlm harness ls tasks` lists them "
            "(add --include-path DIR for local ones)"
        )
    return manager


def task_scores(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``task/metric`` -> value of a results dict (a filter other than ``none`` named after it; no stderr)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, int | float | bool):
                continue
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f" ({filt})")] = float(value)
    return out
