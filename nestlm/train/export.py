"""Any training checkpoint becomes a model: ``nestlm export-checkpoint RUN/checkpoints/step-N --out DIR``.

The run's recipe (run.json) and its ranked parent (RUN/parent, or the recipe's model.path)
give the architecture, importance and tokenizer; the checkpoint gives the weights and the
routers at that step (read in one process, whatever world size wrote it); the budgets are
frozen from those routers exactly as at the end of a run. The result is a plain elastic
nestlm directory: ``nestlm.load``, eval, serve and slice take it as they take a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import save_pretrained
from ..elastic import training as el
from ..errors import CheckpointError
from ..loading import load
from ..tokenizer import ByteTokenizer
from . import setup
from .checkpointer import STATE_FILE, export_state
from .recipe import Recipe, RecipeError, build
from .rundir import resolve_model_paths


def _run_of(ckpt: Path) -> tuple[Path, Recipe]:
    if not (ckpt / STATE_FILE).is_file():
        there = sorted(p.name for p in ckpt.parent.glob("step-*") if (p / STATE_FILE).is_file())
        have = f"{ckpt.parent} holds {', '.join(there)}" if there else f"{ckpt.parent} holds no complete checkpoint"
        raise CheckpointError(
            f"{ckpt} is not a complete training checkpoint (no {STATE_FILE}); {have}; give RUN/checkpoints/step-N"
        )
    run = ckpt.parent.parent
    try:
        record = json.loads((run / "run.json").read_text())
        recipe = build(Recipe, record["recipe"])
    except (OSError, ValueError, KeyError, RecipeError) as e:
        raise CheckpointError(f"{run / 'run.json'} (the run of {ckpt}) cannot be read: {e}") from None
    resolve_model_paths(recipe, record.get("cwd"))  # relative to where the run began, not to here
    return run, recipe


def export_checkpoint(ckpt: str | Path, out: str | Path) -> dict:
    """Write the model of training checkpoint ``ckpt`` into the new directory ``out``; its frozen budgets."""
    ckpt = Path(ckpt)
    run, recipe = _run_of(ckpt)
    e = recipe.elastic
    model = load(run / "parent") if (run / "parent").is_dir() else setup.build_parent(recipe)
    elastic = recipe.train.mode == "elastic"
    names = list(e.budgets) if elastic else ["full"]
    targets = el.parse_budgets(e) if elastic else {}
    full = {n for n, t in targets.items() if t.kind == "fraction" and t.value >= 1.0}
    routed = [n for n in names if n not in full] if elastic else []
    order = model.importance.layer_order if model.importance else None
    routers = el.make_routers(model.config, e, len(routed), order) if routed else None
    export_state(ckpt, model, routers)
    model.elastic = el.freeze_budgets(model.config, names, targets, routed, routers, e, elastic) if elastic else {}
    tok = ByteTokenizer() if recipe.data.tokenizer == "bytes" else None
    save_pretrained(model, out, routers=routers.state_dict() if routers else None, tokenizer=tok)
    return model.elastic
