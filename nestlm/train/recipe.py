"""Recipes: typed dataclasses read from YAML, with ``key=value`` overrides.

An unknown key or a value of the wrong type is an error that names the key and lists
the valid ones; so is a stage whose budget probabilities do not sum to 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import NestlmError
from .batching import global_batch
from .ranges import check_ranges


class RecipeError(NestlmError):
    """A recipe key, value or combination that cannot be used."""


# train keys a resume may change (bookkeeping, and how the work is laid out over the ranks)
RESUMABLE_KEYS = ("checkpoint_every", "keep_last", "tensorboard", "threads", "device", "eval_every", "compile")
RESUMABLE_KEYS += ("context_parallel",)


@dataclass
class ModelSection:
    """The parent: a checkpoint directory, or a random init from a pattern (tiny recipes)."""

    path: str | None = None  # nestlm or Hugging Face (NemotronH, llama, mistral, qwen2, qwen3) directory
    init: dict[str, Any] | None = None  # ModelConfig.from_pattern arguments: pattern, vocab_size, hidden_size, ...
    seed: int = 0  # random init seed
    # The frozen teacher of elastic (KD) training: a model directory with the same vocabulary, or
    # None for the parent itself (the paper's setting). A pruned student distilled from its
    # unpruned parent (the prune + KD per size baseline) sets model.path=PRUNED, teacher=PARENT.
    teacher: str | None = None
    # The parent's config.json (a path, or a shipped name such as nemotron-nano-12b-v2) for
    # `nestlm train --dry-run` on a machine without model.path's weights
    plan_config: str | None = None


@dataclass
class DataSection:
    """Training text; ``stdlib`` = the Python standard library's sources, ``reasoning:short|long`` = synthetic."""

    train: str | list[Any] = "stdlib"  # a source, a prepared directory, or a blend [{path: A, weight: 0.7}, ...]
    tokenizer: str = "model"  # "model": tokenizer.json of the parent's directory; "bytes": byte-level
    val_fraction: float = 0.02
    seed: int = 0
    max_bytes: int | None = None  # cap on the text read (stdlib / directories)
    num_problems: int = 20000  # for reasoning:* sources
    packing: str = "stream"  # "stream": one token stream cut into blocks; "rows": whole documents per row, padded
    # "all" tokens are targets; "completion": only the answers (assistant turns, completions, reasoning:* solutions);
    # "last_turn": a conversation's last assistant turn only. Both need packing: rows
    loss: str = "all"
    chat_template: str | None = None  # a Jinja file rendering conversations instead of the tokenizer's own template


@dataclass
class MemorySection:
    """Where a memory budget (e.g. ``12GB``) is measured: weights + KV + SSM state."""

    dtype: str = "bfloat16"
    batch: int = 1
    context: int = 4096


@dataclass
class ElasticSection:
    """Budgets, elastic axes and router settings (DESIGN section 1.3)."""

    budgets: dict[str, Any] = field(default_factory=lambda: {"full": 1.0, "75": 0.75, "50": 0.5})
    axes: dict[str, list[Any]] = field(
        default_factory=lambda: {
            "hidden": [1.0, 0.875, 0.75, 0.625, 0.5],
            "mamba_heads": [1.0, 0.75, 0.5],
            "attn_heads": [1.0, 0.5],
            "mlp": [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
            "depth": [0],
        }
    )
    heterogeneous: bool = False
    d_router: int = 256
    router_lr_mult: float = 100.0
    # Adam eps of the routers: once a budget is met their gradients are tiny, and a small eps
    # would blow float noise up into full-size steps (a random walk of the choices)
    router_eps: float = 1e-6
    tau: list[float] = field(default_factory=lambda: [1.0, 0.05])
    logit_scale: list[float] = field(default_factory=lambda: [1.0, 10.0])
    # "soft" (default): full widths run with each axis's mask sum_i pi_i mask_i, so the task loss compares every
    # option; "hard" (the paper's): the argmax option sliced, scaled by pi_c / pi_c.detach() (its gradient only
    # says whether scaling the chosen block helps): 9% / 10% at 75% / 50% in docs/study-claim1.md, soft 55% / 54%
    mask: str = "soft"
    # "learned": Gumbel-Softmax routers choose each budget's sub-network (the paper). "fixed": no
    # routers; each budget is the homogeneous one-shot choice (`nestlm prune --budget`), trained nested
    # as is (Minitron widths, MatFormer-style): the ablation that isolates what the routers cost or give
    router: str = "learned"
    # "random": routers start at random (the paper). "one-shot": fitted first to prefer, with p = 0.6, the
    # axes' choice nearest the homogeneous one-shot architecture (elastic.training.warm_start_routers).
    # "search": fitted first to prefer the axes' choice (within the tolerance) whose sub-network of the
    # parent distils best before any training: least KL to the parent on importance_batches batches
    # (elastic.training.search_router_init; homogeneous routers)
    # the default since the family-quality issue: from "random" the 50% budget's seeds scored 54% or 26%,
    # from "search" 53% and 50% (docs/study-claim1.md). Heterogeneous routers take "random"
    router_init: str = "search"
    # 10 keeps each budget's own choice inside the tolerance (at 1, the paper's, soft routers ended outside it)
    budget_loss_weight: float = 10.0
    tolerance: float = 0.05
    # channel widths (hidden, MLP, expert widths) below the parent's are multiples of this, in the axes'
    # choices and the one-shot architectures: transformers' grouped_mm experts need rows of 16 bytes and
    # tensor cores multiples of 8 (elastic/axes.py WIDTH_MULTIPLE); 1 allows any width
    width_multiple: int = 8
    kd_temperature: float = 1.0
    trainable_teacher: bool = False
    auto_importance: bool = False  # rank + reorder an un-ranked parent on the first train batches
    importance_batches: int = 8
    memory: MemorySection = field(default_factory=MemorySection)


@dataclass
class StageSection:
    """One curriculum stage."""

    name: str = "stage"
    seq_len: int = 256
    # Batch shape (train/batching.py): global_batch = sequences per optimizer step (all ranks), micro_batch =
    # sequences per rank per forward/backward (default global_batch / world); accumulation steps = global_batch /
    # (micro_batch * world). Old recipes: batch_size = the global batch of one micro-step (8 if unset), x grad_accum.
    global_batch: int | None = None
    micro_batch: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    tokens: int | None = None  # alternative to steps: steps = tokens / (global batch * seq_len)
    budget_probs: Any = "uniform"  # "uniform", a list (order of elastic.budgets) or {name: p}
    lr: float | None = None  # defaults to train.lr
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    data: str | list[Any] | None = None  # stage-specific data source or blend (defaults to data.train)


@dataclass
class TrainSection:
    """Optimisation and bookkeeping."""

    mode: str = "elastic"  # "elastic" (KD from the frozen parent + routers) or "plain" (CE, no routers)
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max gradient norm of the model (0: no clipping)
    router_grad_clip: float | None = None  # of the routers, clipped apart from the model (None: grad_clip)
    grad_accum: int = 1  # old recipes only (with stage batch_size); global_batch derives it
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 2
    eval_every: int = 0  # validation loss every N steps (0: at stage ends only)
    eval_batches: int = 4
    # "bfloat16": fp32 master weights, gradients and AdamW moments, bf16 compute (FSDP2 MixedPrecisionPolicy
    # when sharded, autocast in one process), the frozen teacher stored in bf16 (train/precision.py);
    # "auto" = bfloat16 on GPU, float32 on CPU; "float16" is refused (it would need loss scaling)
    dtype: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile every block (nestlm.compile_model): same losses, faster steps
    device: str = "auto"
    tensorboard: bool = True
    threads: int | None = None  # torch CPU threads
    kd_chunk_tokens: int | None = None  # KD/CE from hidden states, the lm_head applied this many tokens at a time
    context_parallel: int = 1  # each sequence in this many parts over as many ranks (train/context_parallel.py)


@dataclass
class Recipe:
    """A whole run: parent, data, training, elastic settings and the curriculum."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    elastic: ElasticSection = field(default_factory=ElasticSection)
    stages: list[StageSection] = field(default_factory=lambda: [StageSection()])
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What makes a run what it is: all but the bookkeeping a resume may change (RESUMABLE_KEYS)."""
        d = self.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_KEYS}
        if self.train.mode == "plain":  # no budgets, no routers: a change of elastic defaults is not another run
            d.pop("elastic")
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except RecipeError as e:
                errors.append(e)
        raise RecipeError(f"{where} = {value!r} must be {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping of {_type_name(tp)} keys, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} = {value!r} must be a list")
        (a,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} = {value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where} = {value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} = {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where} = {value!r} must be a string")
    return value


def build(cls: type, data: dict[str, Any], where: str = "recipe") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise RecipeError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    cur: Any = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(cur, list):
            cur = cur[int(p)]
        else:
            nxt = cur.get(p)
            if nxt is None:
                nxt = [] if parts[i + 1].isdigit() else {}
                cur[p] = nxt
            cur = nxt
    last = parts[-1]
    if isinstance(cur, list):
        idx = int(last)
        if idx >= len(cur):
            raise RecipeError(f"override {path}: index {idx} is past the {len(cur)} entries")
        cur[idx] = value
    else:
        cur[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``train.lr=1e-3`` or ``stages.0.steps=5``: values are parsed as YAML."""
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} must look like key=value (e.g. train.lr=1e-3)")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        try:
            _set_path(data, key.strip(), value)
        except (ValueError, IndexError, TypeError, AttributeError):
            raise RecipeError(f"override {ov!r}: {key!r} does not name a recipe entry") from None
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (a path, or the name of a shipped recipe such as ``tiny``)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            shipped = Path(__file__).resolve().parent.parent / "recipes" / f"{Path(str(path)).stem}.yaml"
            if shipped.is_file():
                p = shipped
            else:
                raise RecipeError(f"recipe {path} does not exist (shipped recipes: {', '.join(shipped_recipes())})")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p} must hold a mapping of recipe sections")
    data = apply_overrides(data, overrides or [])
    recipe = build(Recipe, data)
    validate(recipe)
    return recipe


def shipped_recipes() -> list[str]:
    d = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(p.stem for p in d.glob("*.yaml"))


def stage_probs(recipe: Recipe, stage: StageSection) -> list[float]:
    """Budget probabilities of a stage, in the order of elastic.budgets."""
    names = list(recipe.elastic.budgets)
    bp = stage.budget_probs
    if bp == "uniform":
        return [1.0 / len(names)] * len(names)
    if isinstance(bp, list):
        if len(bp) != len(names):
            raise RecipeError(
                f"stage {stage.name!r}: budget_probs has {len(bp)} entries for {len(names)} budgets "
                f"({', '.join(names)})"
            )
        probs = [float(p) for p in bp]
    elif isinstance(bp, dict):
        unknown = [k for k in bp if k not in names]
        if unknown:
            raise RecipeError(
                f"stage {stage.name!r}: unknown budget {unknown[0]!r} in budget_probs; budgets: {', '.join(names)}"
            )
        probs = [float(bp.get(n, 0.0)) for n in names]
    else:
        raise RecipeError(f"stage {stage.name!r}: budget_probs must be 'uniform', a list or a mapping, got {bp!r}")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise RecipeError(
            f"stage {stage.name!r}: budget_probs {probs} must be non-negative and sum to 1 (they sum to {sum(probs):g})"
        )
    return probs


def validate(recipe: Recipe) -> None:
    """Ranges (train/ranges.py), then cross-field checks that types alone cannot express."""
    check_ranges(recipe, RecipeError)
    if recipe.train.mode not in ("elastic", "plain"):
        raise RecipeError(f"train.mode {recipe.train.mode!r} must be 'elastic' or 'plain'")
    if (recipe.model.path is None) == (recipe.model.init is None):
        if recipe.model.path is None:
            raise RecipeError("give one of model.path (a checkpoint) and model.init (a random parent); both are unset")
        raise RecipeError(
            "give exactly one of model.path (a checkpoint) and model.init (a random parent); this recipe sets both: "
            "to start from the checkpoint add model.init=null (e.g. `nestlm train tiny model.path=DIR model.init=null`)"
        )
    if recipe.model.teacher is not None and (recipe.train.mode != "elastic" or recipe.elastic.trainable_teacher):
        raise RecipeError("model.teacher needs train.mode: elastic with elastic.trainable_teacher: false")
    if recipe.elastic.mask not in ("hard", "soft"):
        raise RecipeError(f"elastic.mask {recipe.elastic.mask!r} must be 'hard' or 'soft'")
    if recipe.elastic.heterogeneous and recipe.elastic.router_init != "random":
        raise RecipeError(
            f"elastic.router_init: {recipe.elastic.router_init} needs homogeneous routers; with "
            "elastic.heterogeneous: true set elastic.router_init: random"
        )
    if recipe.elastic.router_init not in ("random", "one-shot", "search"):
        raise RecipeError(
            f"elastic.router_init {recipe.elastic.router_init!r} must be 'random', 'one-shot' or 'search'"
        )
    if recipe.elastic.router not in ("learned", "fixed"):
        raise RecipeError(f"elastic.router {recipe.elastic.router!r} must be 'learned' or 'fixed'")
    if recipe.data.tokenizer not in ("model", "bytes"):
        raise RecipeError(f"data.tokenizer {recipe.data.tokenizer!r} must be 'model' or 'bytes'")
    if recipe.data.packing not in ("stream", "rows"):
        raise RecipeError(f"data.packing {recipe.data.packing!r} must be 'stream' or 'rows'")
    if recipe.data.loss not in ("all", "completion", "last_turn"):
        raise RecipeError(f"data.loss {recipe.data.loss!r} must be 'all', 'completion' or 'last_turn'")
    if recipe.data.loss != "all" and recipe.data.packing != "rows":
        raise RecipeError(
            f"data.loss: {recipe.data.loss} needs data.packing: rows (a packed stream has no prompt boundaries)"
        )
    if recipe.train.kd_chunk_tokens is not None and recipe.train.kd_chunk_tokens < 0:
        raise RecipeError(
            f"train.kd_chunk_tokens must be >= 0 (0 or null: full logits), got {recipe.train.kd_chunk_tokens}"
        )
    if not recipe.stages:
        raise RecipeError("a recipe needs at least one stage")
    if (cp := recipe.train.context_parallel) < 1 or (cp > 1 and recipe.train.compile):
        raise RecipeError(f"train.context_parallel {cp} must be >= 1, and 1 with train.compile (not traced)")
    for s in recipe.stages:
        if s.seq_len % cp:
            raise RecipeError(f"stage {s.name!r}: seq_len {s.seq_len} is not divisible by train.context_parallel {cp}")
        if (s.steps is None) == (s.tokens is None):
            raise RecipeError(f"stage {s.name!r}: give exactly one of steps and tokens")
        if s.global_batch is not None and (s.batch_size is not None or recipe.train.grad_accum != 1):
            raise RecipeError(
                f"stage {s.name!r}: give global_batch (+ micro_batch) or the old batch_size (+ train.grad_accum), "
                "not both"
            )
        if s.global_batch is None and s.micro_batch is not None:
            raise RecipeError(f"stage {s.name!r}: micro_batch needs global_batch")
        if recipe.train.mode == "elastic":
            stage_probs(recipe, s)
    if recipe.train.mode == "elastic" and not recipe.elastic.budgets:
        raise RecipeError("elastic.budgets is empty; name at least one budget (e.g. full: 1.0)")
    for name in ("tau", "logit_scale"):
        v = getattr(recipe.elastic, name)
        if len(v) != 2 or min(v) <= 0:
            raise RecipeError(f"elastic.{name} must be [start, end], both > 0, got {v}")


def stage_steps(stage: StageSection, train: TrainSection | None = None) -> int:
    """Optimizer steps of a stage: ``steps``, or ``tokens`` / tokens per step (the global batch, any world size)."""
    if stage.steps is not None:
        return stage.steps
    return max(1, stage.tokens // (global_batch(stage, train or TrainSection()) * stage.seq_len))
