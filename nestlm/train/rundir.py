"""The run directory before training starts: new, resumed, or a start that never reached a checkpoint.

A start can fail after the directory was begun (a bad value found late, Ctrl-C during importance,
a crash before the first checkpoint). Such a directory holds nothing worth keeping, so the same
command run again starts it afresh instead of sending the user to ``rm -rf``. A directory holding a
checkpoint is never cleared: it is resumed with ``--resume``, and when the recipe differs the
message names the keys that differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import require_new_dir
from ..errors import NestlmError
from .checkpointer import CHECKPOINTS, METRICS, Checkpointer
from .recipe import Recipe, RecipeError, build

RUN_FILE = "run.json"
# What a start writes before its first checkpoint (trainer.py, setup.open_tensorboard): only these are cleared.
STARTED_FILES = frozenset({RUN_FILE, "recipe.yaml", "parent", CHECKPOINTS, METRICS, "tb"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}, "stages": [{...}]}`` -> ``{"train.lr": 1e-3, "stages.0....": ...}``."""
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def stored_fingerprint(run: dict[str, Any]) -> str | None:
    """The fingerprint of a run.json's recipe, re-read with today's defaults for keys added since it was written."""
    try:
        return build(Recipe, run.get("recipe") or {}).fingerprint()
    except (RecipeError, TypeError, AttributeError):
        return None


def recipe_differences(stored: dict[str, Any], recipe: Recipe, limit: int = 4) -> list[str]:
    """The keys (with both values) by which ``recipe`` differs from a run.json's recipe, bookkeeping left out."""
    try:
        old = build(Recipe, stored).identity()  # keys added since take their defaults, as the fingerprint does
    except (RecipeError, TypeError, AttributeError):
        old = stored
    a, b = _flat(old), _flat(recipe.identity())
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    shown = [f"{k}: {a.get(k, '(absent)')!r} there, {b.get(k, '(absent)')!r} now" for k in keys[:limit]]
    return shown + ([f"and {len(keys) - limit} more"] if len(keys) > limit else [])


def check_out_dir(out: Path, recipe: Recipe, resume: bool, ckpt: Checkpointer, error: type[NestlmError]) -> bool:
    """Refuse what cannot start (one line naming the fix); True when a failed start must be cleared first."""
    run = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a directory")
    stored = _read_run(run, error) if run.is_file() else None
    same = stored is not None and recipe.fingerprint() in (stored.get("fingerprint"), stored_fingerprint(stored))
    latest = ckpt.latest()
    if not resume:
        if stored is not None and latest is None and {p.name for p in out.iterdir()} <= STARTED_FILES:
            return True  # a start that never reached a checkpoint: nothing in it to keep
        if stored is None:
            what = "files"
        elif same:
            what = f"this run (its last checkpoint is {latest.name})" if latest else "this run"
        else:
            what = "a different run (" + "; ".join(recipe_differences(stored.get("recipe") or {}, recipe)) + ")"
        msg = f"--out {out} already holds {what}; pass --resume to continue it, or choose a new --out"
        require_new_dir(out, "--out", error, not_empty=msg)
        return False
    if stored is None:
        raise error(f"--resume: {out} holds no run to resume (no {RUN_FILE}); drop --resume to start")
    if not same:
        diff = "; ".join(recipe_differences(stored.get("recipe") or {}, recipe))
        raise error(
            f"--out {out} holds a different run ({diff}); resume with the same recipe and overrides, "
            "or choose a new --out"
        )
    if latest is None:
        raise error(f"--resume: {out} has no complete checkpoint yet; start again without --resume")
    resolve_model_paths(recipe, stored.get("cwd"))  # resumed from another directory
    return False


def resolve_model_paths(recipe: Recipe, start: str | None) -> None:
    """A relative model.path / model.teacher that does not resolve here, resolved against ``start``, the
    directory the run began in (run.json's ``cwd``; runs written before it was recorded have none)."""
    for key in ("path", "teacher"):
        v = getattr(recipe.model, key)
        if v and start and not Path(v).is_absolute() and not Path(v).exists():
            setattr(recipe.model, key, str(Path(start) / v))


def _read_run(run: Path, error: type[NestlmError]) -> dict[str, Any]:
    try:
        stored = json.loads(run.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{run} cannot be read ({e}); choose a new --out") from None
    if not isinstance(stored, dict):
        raise error(f"{run} is not a run record; choose a new --out")
    return stored


def clear_failed_start(out: Path) -> None:
    """Remove what a start that never reached a checkpoint wrote (only the names in STARTED_FILES)."""
    print(f"nestlm: {out} holds a start that never reached a checkpoint; starting it again", flush=True)
    for p in out.iterdir():
        if p.name in STARTED_FILES:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
