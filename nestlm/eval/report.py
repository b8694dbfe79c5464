"""Reports: a terminal table, a JSON file, a markdown table and a PNG plot of quality vs size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt_params(n: float) -> str:
    for unit, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.2f}{s}"
    return str(int(n))


COLUMNS = [
    ("name", "model", str),
    ("kind", "kind", str),
    ("params", "params", _fmt_params),
    ("fraction", "of parent", lambda v: f"{v:.1%}"),
    ("ppl", "held-out ppl", lambda v: f"{v:.3f}"),
    ("loss", "loss (nats)", lambda v: f"{v:.4f}"),
    ("accuracy", "reasoning acc", lambda v: f"{v:.1%}"),
    ("accuracy_ci", "95% interval", lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"),
    ("accuracy_n", "problems", str),
]


def task_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The lm-evaluation-harness columns (``task/metric``) of the rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in (r.get("tasks") or {})))


def _value(r: dict[str, Any], key: str) -> Any:
    """A row's value of a fixed column, or of a harness column ``tasks:task/metric``."""
    return (r.get("tasks") or {}).get(key[6:]) if key.startswith("tasks:") else r.get(key)


def _cols(rows: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    fixed = [c for c in COLUMNS if any(c[0] in r and r[c[0]] is not None for r in rows)]
    return fixed + [("tasks:" + k, k, lambda v: f"{v:.4f}") for k in task_keys(rows)]


def _cell(r: dict[str, Any], c: tuple[str, str, Any]) -> str:
    v = _value(r, c[0])
    return c[2](v) if v is not None else ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = _cols(rows)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], title: str = "nestlm evaluation") -> None:
    """The rows on the terminal, and the lm-evaluation-harness scores as a second table: one line per task
    metric, one column per model. No name or number is ever cut or wrapped (``acc`` and ``acc_norm`` stay
    apart): a table wider than the terminal is printed at its own width."""
    from rich.table import Table

    cols = [c for c in _cols(rows) if not c[0].startswith("tasks:")]
    table = Table(title=title)
    for _, head, _ in cols:
        table.add_column(head, justify="left" if head in ("model", "kind") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[_cell(r, c) for c in cols])
    _print_whole(table)
    keys = task_keys(rows)
    if not keys:
        return
    tasks = Table(title="lm-evaluation-harness")
    tasks.add_column("task", no_wrap=True)
    tasks.add_column("metric", no_wrap=True)
    for r in rows:
        tasks.add_column(str(r.get("name")), justify="right", no_wrap=True)
    for k in keys:
        task, _, metric = k.partition("/")
        values = [(r.get("tasks") or {}).get(k) for r in rows]
        tasks.add_row(task, metric, *["" if v is None else f"{v:.4f}" for v in values])
    _print_whole(tasks)


def _print_whole(table: Any) -> None:
    """Print ``table`` on the terminal, or at its own width where the terminal is narrower (nothing cut)."""
    from rich.console import Console

    console = Console()
    need = Console(width=100_000).measure(table).maximum
    (console if need <= console.width else Console(width=need)).print(table)


def plot(rows: list[dict[str, Any]], path: str | Path, metric: str = "ppl") -> None:
    """Quality (``metric``) against parameter count: one point per model, grouped by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in (metric, "accuracy") if any(r.get(m) is not None for r in rows)]
    metrics += ["tasks:" + k for k in task_keys(rows)]  # one panel per harness task metric
    metrics = metrics or [metric]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    axes = axes[0]
    markers = {"elastic": "o", "pruned": "x", "parent": "*", "model": "s"}
    for ax, m in zip(axes, metrics, strict=True):
        kinds = sorted({r.get("kind", "model") for r in rows})
        for kind in kinds:
            pts = sorted(
                (r["params"], _value(r, m), r["name"])
                for r in rows
                if r.get("kind", "model") == kind and _value(r, m) is not None
            )
            if not pts:
                continue
            xs, ys, names = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=markers.get(kind, "s"), linestyle="-" if kind == "elastic" else ":", label=kind)
            for x, y, n in pts:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("parameters")
        labels = {"ppl": "held-out perplexity (lower is better)", "accuracy": "reasoning exact match"}
        ax.set_ylabel(labels.get(m, m.removeprefix("tasks:")))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("nestlm: quality vs size")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    title: str = "nestlm evaluation",
    files: dict[str, str] | None = None,
) -> dict[str, Path]:
    """eval.json, report.md and quality.png (and ``files``: more name -> text) in out_dir; returns their paths.

    All or none: they are written into a temporary directory inside out_dir and renamed into place
    together (``checkpoint.atomic_files``), so a failure halfway (the plot, a full disk) leaves a previous
    report in out_dir whole and no temporary directory behind. Other files of out_dir are left alone."""
    from ..checkpoint import atomic_files

    out = Path(out_dir)
    names = {"json": "eval.json", "markdown": "report.md", "plot": "quality.png"}
    with atomic_files(out, ".report-tmp", last=names["json"]) as tmp:
        (tmp / names["json"]).write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2) + "\n")
        md = [f"# {title}", "", markdown_table(rows), ""]
        if extra and extra.get("notes"):
            md += [str(n) for n in extra["notes"]] + [""]
        md += ["![quality vs size](quality.png)", ""]
        (tmp / names["markdown"]).write_text("\n".join(md))
        plot(rows, tmp / names["plot"])
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return {k: out / v for k, v in names.items()}
