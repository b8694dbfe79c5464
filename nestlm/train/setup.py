"""What a run needs before its loop: device, parent model, tokenizer, data loaders, optimizer, logging.

Kept apart from the loop (trainer.py) so that the loop reads like its loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..compiler import compile_model
from ..config import ModelConfig
from ..elastic.importance import estimate_importance, reorder, require_reordered
from ..errors import NestlmError
from ..loading import load
from ..model import HybridLM
from ..tokenizer import ByteTokenizer, is_byte_level, load_tokenizer
from . import loader as loader_mod
from . import shards, sources
from .batching import global_batch
from .chat import ChatFormat
from .distributed import DistInfo
from .recipe import Recipe


def device_and_dist(device: str, init: Callable[[torch.device], DistInfo]) -> tuple[torch.device, DistInfo]:
    """The run's device ("auto": CUDA when present) and its process group (one GPU per rank)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dist = init(dev)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    return dev, dist


def build_parent(r: Recipe) -> HybridLM:
    """The parent: loaded from model.path, or initialised from model.init (a pattern plus widths)."""
    if r.model.path is not None:
        return load(r.model.path)
    init = dict(r.model.init or {})
    pattern = init.pop("pattern", None)
    if pattern is None:
        raise NestlmError("model.init needs a 'pattern' (e.g. 'M-M*-M-') plus vocab_size and hidden_size")
    if r.data.tokenizer == "bytes":
        init.setdefault("vocab_size", ByteTokenizer.vocab_size)
        init.setdefault("eos_token_id", ByteTokenizer.eos_token_id)
        init.setdefault("pad_token_id", ByteTokenizer.pad_token_id)
    try:
        cfg = ModelConfig.from_pattern(pattern, **init)
    except TypeError as e:
        raise NestlmError(f"model.init: {e}") from None
    model = HybridLM(cfg)
    model.reset_parameters(seed=r.model.seed)
    return model


def model_tokenizer(model: HybridLM) -> Any:
    return load_tokenizer(model.source_dir)


def blend_parts(src: Any, where: str) -> list[tuple[str, float]]:
    """A data source as (path, weight) parts: one source, or a blend ``[{path: A, weight: 0.7}, ...]``."""
    if isinstance(src, str):
        return [(src, 1.0)]
    parts = []
    for i, p in enumerate(src if isinstance(src, list) else [src]):
        w = p.get("weight", 1.0) if isinstance(p, dict) else None
        if not isinstance(p, dict) or set(p) - {"path", "weight"} or not isinstance(p.get("path"), str):
            raise NestlmError(f"{where}[{i}] must be {{path: SOURCE, weight: W}}, got {p!r}")
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise NestlmError(f"{where}[{i}].weight must be a number >= 0, got {w!r}")
        parts.append((p["path"], float(w)))
    if not parts or sum(w for _, w in parts) <= 0:
        raise NestlmError(f"{where}: a blend needs at least one source with a weight > 0")
    return parts


def chat_format(recipe: Recipe) -> ChatFormat:
    """What renders conversations: the parent directory's tokenizer and chat template (or data.chat_template)."""
    path, d = recipe.model.path, recipe.data
    byte_dir = path is not None and is_byte_level(path)
    return ChatFormat(path if path is not None and (d.tokenizer != "bytes" or byte_dir) else "bytes", d.chat_template)


class StageData:
    """The data of every stage: tokens read once per source (memory-mapped when prepared by
    ``nestlm data prepare``), a resumable loader per stage; a blend of sources mixes their loaders.

    With packing: rows every source's documents are read (and conversations rendered) once, before
    any write, and kept until the last stage that uses them has its rows: a record longer than a
    stage's row is refused then, in one line naming it."""

    def __init__(self, recipe: Recipe, tokenizer: Any, dist: DistInfo) -> None:
        self.recipe, self.tokenizer, self.dist = recipe, tokenizer, dist
        self.chat = chat_format(recipe)
        if recipe.data.chat_template:  # read now (the final model carries it): a bad file fails before any write
            self.chat.template("data.chat_template")
        self.tokens: dict[str, Any] = {}
        self.docs: dict[str, list] = {}
        self.last_use: dict[str, int] = {}
        for path, _ in blend_parts(recipe.data.train, "data.train"):  # a bad source fails before any write
            if recipe.data.packing == "stream":
                self._tokens(path)
        for i, st in enumerate(recipe.stages):
            where = f"stages.{i}.data" if st.data is not None else "data.train"
            for path, _ in blend_parts(st.data or recipe.data.train, where):
                if recipe.data.packing == "rows":  # (reasoning:* problems: one, generated to check the source)
                    loader_mod.check_fits(self._documents(path, 1), st.seq_len)
                self.last_use[path] = i

    def _tokens(self, source: str) -> Any:
        d = self.recipe.data
        if source not in self.tokens:
            if shards.is_prepared(source):
                prepared = shards.Prepared(source)
                prepared.check_vocab(getattr(self.tokenizer, "vocab_size", None))
                self.tokens[source] = prepared.tokens()
            else:
                self.tokens[source] = sources.load_tokens(
                    source, self.tokenizer, d.max_bytes, d.num_problems, d.seed, chat=self.chat
                )
        return self.tokens[source]

    def _documents(self, source: str, num_problems: int) -> list[tuple[Any, ...]]:
        """The documents of a source (loaded once; reasoning:* problems are generated again per count)."""
        d = self.recipe.data
        if sources.is_reasoning(source):
            return sources.load_documents(source, self.tokenizer, d.max_bytes, num_problems, d.seed, loss=d.loss)
        if source not in self.docs:
            if shards.is_prepared(source):
                self.docs[source] = shards.Prepared(source).documents(loss=d.loss)
            else:
                self.docs[source] = sources.load_documents(
                    source, self.tokenizer, d.max_bytes, num_problems, d.seed, loss=d.loss, chat=self.chat
                )
        return self.docs[source]

    def loader(self, stage_idx: int, whole_batch: bool = False) -> Any:
        stage = self.recipe.stages[stage_idx]
        d = self.recipe.data
        parts = blend_parts(stage.data or d.train, f"stages.{stage_idx}.data" if stage.data else "data.train")
        rank, world = (0, 1) if whole_batch else (self.dist.rank, self.dist.world)
        loaders = []
        for j, (src, _) in enumerate(parts):
            if d.packing == "rows":  # whole documents per row (see train/loader.py)
                pad = getattr(self.tokenizer, "pad_token_id", None) or 0
                docs = self._documents(src, d.num_problems)
                packed: Any = loader_mod.PackedRows(docs, stage.seq_len, d.val_fraction, src, pad_id=pad)
                if not whole_batch and self.last_use.get(src, -1) <= stage_idx:
                    self.docs.pop(src, None)  # no later stage packs it: its rows hold it now
            else:
                packed = loader_mod.PackedBlocks(self._tokens(src), stage.seq_len, d.val_fraction, src)
            one = len(parts) == 1  # a blend's sources give global indices; the blend shards them
            loaders.append(
                loader_mod.BlockLoader(
                    packed,
                    seq_len=stage.seq_len,
                    batch_size=global_batch(stage, self.recipe.train),  # the whole step; ranks take shares
                    seed=d.seed + stage_idx + 7919 * j,
                    val_fraction=d.val_fraction,
                    rank=rank if one else 0,
                    world=world if one else 1,
                    name=src,
                )
            )
        if len(loaders) == 1:
            return loaders[0]
        return loader_mod.BlendLoader(loaders, [w for _, w in parts], seed=d.seed + stage_idx, rank=rank, world=world)


def needs_ranking(model: HybridLM, e: Any) -> bool:
    """Whether elastic training must first rank and reorder the parent: it was never reordered and
    some budget is nested (KD of one model at its full size, e.g. a pruned student, needs no ranking)."""
    from ..elastic.arch import parse_target

    only_full = all((t := parse_target(v)).kind == "fraction" and t.value >= 1.0 for v in e.budgets.values())
    return not only_full and (model.importance is None or not model.importance.reordered)


def frozen_teacher(model: HybridLM, recipe: Recipe) -> HybridLM:
    """The frozen teacher of KD: the directory ``model.teacher`` names, or a copy of the parent itself."""
    import copy

    if recipe.model.teacher is None:
        return copy.deepcopy(model).eval().requires_grad_(False)
    teacher = load(recipe.model.teacher).eval().requires_grad_(False)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise NestlmError(
            f"model.teacher {recipe.model.teacher} has vocabulary {teacher.config.vocab_size}, "
            f"the student {model.config.vocab_size}; distillation needs the same vocabulary"
        )
    return teacher


def auto_importance(
    model: HybridLM, recipe: Recipe, data: StageData, progress: bool, device: torch.device | None = None
) -> None:
    """Rank and reorder a parent that was never ranked (or refuse, without elastic.auto_importance).

    The forward passes run on ``device`` (the run's: the GPU when there is one); the model
    comes back to the CPU, where the trainer writes the ranked parent and copies the teacher."""
    e = recipe.elastic
    if not e.auto_importance:
        require_reordered(model, "elastic training")
    if device is not None:
        model.to(device)
    loader = data.loader(0, whole_batch=True)  # every rank ranks on the same data
    batches = [loader.next_batch()[0] for _ in range(e.importance_batches)]
    imp = estimate_importance(model, batches, progress=progress)
    reorder(model.cpu(), imp)


def compile_models(*models: HybridLM | None) -> None:
    """train.compile: torch.compile every block of the student and the frozen teacher (in place)."""
    for m in models:
        if m is not None:
            compile_model(m)


def optimizer(model: HybridLM, routers: torch.nn.Module | None, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the model, and the routers at router_lr_mult times the LR (no weight decay)."""
    tr, e = recipe.train, recipe.elastic
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": tr.lr, "base_lr": tr.lr}]
    if routers is not None:
        rlr = tr.lr * e.router_lr_mult
        groups.append(
            {"params": list(routers.parameters()), "lr": rlr, "base_lr": rlr, "weight_decay": 0.0, "eps": e.router_eps}
        )
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)


def open_tensorboard(enabled: bool, out: Path) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(out / "tb"))


def tensorboard_log(tb: Any, rec: dict[str, Any]) -> None:
    if tb is None:
        return
    for k, v in rec.items():
        if isinstance(v, (int, float)) and k != "step":
            tag = f"{k}/{rec['budget']}" if k in ("loss", "kd", "budget_loss") and "budget" in rec else k
            tb.add_scalar(tag, v, rec["step"])


def progress_fields(ema: dict[str, float], tokens_per_s: float, m: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix: the smoothed loss per budget, throughput, temperature."""
    return {
        **{f"{k}": f"{v:.3f}" for k, v in ema.items()},
        "tok/s": f"{tokens_per_s:.0f}",
        **({"tau": f"{m['tau']:.2f}"} if "tau" in m else {}),
    }
