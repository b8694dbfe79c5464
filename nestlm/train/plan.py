"""``nestlm train RECIPE --dry-run [--world-size N]``: the per-rank memory plan of every stage.

The parent is built on the meta device (shapes, no storage), so a 12B recipe plans in
seconds on a CPU. The plan assumes what the trainer does on N > 1 ranks: FSDP2 full
sharding of the student and the frozen teacher over all N ranks, fp32 master weights,
gradients and AdamW moments (sharded), bf16 compute (train/precision.py). Per rank:

  parameters   4 B x P / N (fp32 master)      teacher  2 B x P / N (bf16, frozen)
  gradients    4 B x P / N (fp32)             optimizer 8 B x P / N (AdamW m and v, fp32)
  gathered     the root's and two blocks' bf16 weights unsharded at once (one prefetched),
               and their unsharded gradients
  activations  per micro-batch of T = micro_batch x seq_len tokens: with activation
               checkpointing every block's input (T x hidden) plus one block recomputed
               (x2 for its backward); without, every block's intermediates. Block
               intermediates per token: MLP 2 x ffn; attention (2 q + 2 kv) x head_dim;
               Mamba 6 x d_inner + 4 x groups x d_state + heads, plus the SSD scan's
               chunk terms (heads x chunk_size and heads x head_dim x d_state / chunk_size, fp32)
  soft masks   elastic.mask: soft runs the full widths with each budget's mask multiplied in: every
               masked tensor is kept once more for the mask's gradient (2 B per token per masked
               channel: the block output, the MLP hidden, the attention heads, the Mamba heads)
  context      train.context_parallel = K: each sequence in K parts over K ranks (world = data x K), so
  parallel     T above is micro_batch x seq_len / K; plus what the parts exchange, for the last part
               (the largest): per attention layer the keys and values of the whole sequence as SDPA
               keeps them (repeated to the query heads, bf16) and their gather (KV heads); per Mamba
               layer every part's state summary and the initial state's contribution (fp32); one
               layer's (x2, its backward) with activation checkpointing, every layer's without
  loss         chunked KD (train.kd_chunk_tokens = C): four fp32 C x vocab tensors (teacher
               log-probs, student logits, log-probs, their gradient) and both models' final
               hidden states; unchunked: six fp32 T x vocab tensors

It is a plan from these formulas, not a measurement: a stage "fits" when the total stays
RESERVE_GIB below the GPU's memory (CUDA context, NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import NestlmError
from .batching import Batching, stage_batching
from .recipe import Recipe

GIB = 2**30
GPU_GIB = 80
RESERVE_GIB = 8
CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"


def parent_config(recipe: Recipe) -> ModelConfig:
    """The parent's ModelConfig without its weights: model.path's config.json, else model.plan_config, else init."""
    from ..checkpoint import read_config_json, read_nestlm_config
    from ..interop.formats import family

    m = recipe.model
    if m.path is not None and (Path(m.path) / "config.json").is_file():
        raw = read_config_json(Path(m.path))
        if raw.get("model_type") == "nestlm":
            return read_nestlm_config(Path(m.path), raw)
        where = str(Path(m.path) / "config.json")
        return family(raw.get("model_type"), where).config_from_hf(raw, where)
    if m.plan_config is not None:
        p = Path(m.plan_config)
        if not p.is_file():
            p = CONFIGS / f"{m.plan_config}.json"
        if not p.is_file():
            shipped = ", ".join(sorted(q.stem for q in CONFIGS.glob("*.json")))
            raise NestlmError(f"model.plan_config {m.plan_config!r} is not a file or a shipped config ({shipped})")
        raw = json.loads(p.read_text())
        return family(raw.get("model_type"), str(p)).config_from_hf(raw, str(p))
    if m.init is not None:
        from .setup import build_parent

        with torch.device("meta"):
            return build_parent(recipe).config
    raise NestlmError(
        f"--dry-run: model.path {m.path} is not on this machine; set model.plan_config to its config.json "
        f"(or a shipped name: {', '.join(sorted(q.stem for q in CONFIGS.glob('*.json')))})"
    )


@dataclass
class StagePlan:
    """Bytes per rank of one stage at one world size."""

    name: str
    seq_len: int
    batching: Batching
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_gib: float = GPU_GIB) -> bool:
        return self.total <= (gpu_gib - RESERVE_GIB) * GIB


def _block_act_per_token(cfg: ModelConfig, ls: Any) -> float:
    """Bytes per token of a block's intermediates kept for its backward (bf16, fp32 SSD terms)."""
    d = cfg.hidden_size
    if ls.kind == "mlp":
        return 2 * (d + 2 * ls.ffn)
    if ls.kind == "attention":
        return 2 * (d + (2 * ls.heads + 2 * ls.kv_heads) * ls.head_dim)
    if ls.kind == "moe":  # per token: its input gathered top-k times, each expert's hidden, the shared expert's
        return 2 * (d + cfg.moe_top_k * (d + 2 * ls.ffn) + 2 * ls.shared_ffn)
    di = ls.heads * ls.head_dim
    ssd = 4 * (ls.heads * cfg.mamba_chunk_size + ls.heads * ls.head_dim * ls.d_state / cfg.mamba_chunk_size)
    return 2 * (d + 6 * di + 4 * ls.groups * ls.d_state + ls.heads) + ssd


def _soft_mask_per_token(cfg: ModelConfig, ls: Any) -> float:
    """Bytes per token that soft router masks add to a block: one more bf16 copy of each masked tensor."""
    d = cfg.hidden_size
    if ls.kind == "mlp":
        return 2 * (d + ls.ffn)
    if ls.kind == "attention":
        return 2 * (d + ls.heads * ls.head_dim)
    if ls.kind == "moe":
        return 2 * (d + cfg.moe_top_k * ls.ffn + ls.shared_ffn)
    return 2 * (d + ls.heads * ls.head_dim)


def _context_per_layer(cfg: ModelConfig, ls: Any, micro: int, seq_len: int, k: int) -> float:
    """Bytes the last of k parts holds for one layer's exchange (train/context_parallel.py)."""
    if ls.kind == "attention":  # K and V of all seq_len positions: repeated to the query heads, and gathered
        return 2 * 2 * micro * seq_len * ls.head_dim * (ls.heads + 2 * ls.kv_heads)
    if ls.kind == "mamba":  # the k summaries (P x N state + 2) per head, and C . h0 decayed (P + 1 per head)
        t = micro * seq_len // k
        return 4 * ls.heads * (k * micro * (ls.head_dim * ls.d_state + 2) + t * (2 * ls.head_dim + 1))
    return 0.0


def plan_stage(recipe: Recipe, cfg: ModelConfig, sizes: dict[str, int], stage_idx: int, world: int) -> StagePlan:
    tr, stage = recipe.train, recipe.stages[stage_idx]
    cp = tr.context_parallel
    if world % cp:
        raise NestlmError(f"train.context_parallel {cp} must divide the world size {world}")
    b = stage_batching(stage, tr, world // cp)  # data-parallel ranks: each context group shares its sequences
    n_all, root, block = sizes["total"], sizes["root"], sizes["block"]
    shard = math.ceil(n_all / world)
    sp = StagePlan(stage.name, stage.seq_len, b)
    sp.parts["parameters (fp32 master)"] = 4 * shard
    if recipe.train.mode == "elastic" and not recipe.elastic.trainable_teacher:
        sp.parts["teacher (bf16, frozen)"] = 2 * shard
    sp.parts["gradients (fp32)"] = 4 * shard
    sp.parts["optimizer (AdamW m, v fp32)"] = 8 * shard
    sp.parts["gathered weights + grads"] = 2 * (root + 2 * block) + 4 * (root + block) if world > 1 else 0
    tokens = b.micro_batch * stage.seq_len // cp  # this rank's part of every sequence
    res = 4 if cfg.residual_in_fp32 or world == 1 else 2  # one process: autocast keeps an fp32 residual
    per_block = [_block_act_per_token(cfg, ls) for ls in cfg.layers]
    if tr.activation_checkpointing:
        act = tokens * (cfg.n_layers * cfg.hidden_size * res + 2 * max(per_block))
    else:
        act = tokens * (cfg.n_layers * cfg.hidden_size * res + sum(per_block))
    sp.parts["activations / micro-batch"] = act
    if cp > 1:
        per_layer = [_context_per_layer(cfg, ls, b.micro_batch, stage.seq_len, cp) for ls in cfg.layers]
        sp.parts["context-parallel exchange"] = 2 * max(per_layer) if tr.activation_checkpointing else sum(per_layer)
    if recipe.train.mode == "elastic" and recipe.elastic.router == "learned" and recipe.elastic.mask == "soft":
        soft = [_soft_mask_per_token(cfg, ls) for ls in cfg.layers]
        sp.parts["soft masks / micro-batch"] = tokens * (2 * max(soft) if tr.activation_checkpointing else sum(soft))
    chunk = tr.kd_chunk_tokens
    if chunk:
        sp.parts["loss chunk"] = 4 * 4 * min(chunk, tokens) * cfg.vocab_size + 2 * 2 * tokens * cfg.hidden_size
    else:
        sp.parts["loss (unchunked)"] = 6 * 4 * tokens * cfg.vocab_size
    return sp


def model_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the whole model, its root (embeddings, head, final norm) and its largest block."""
    from ..model import HybridLM

    with torch.device("meta"):  # shapes only: nothing is allocated
        m = HybridLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    blocks = [sum(p.numel() for p in blk.parameters()) for blk in m.layers]
    return {"total": total, "root": total - sum(blocks), "block": max(blocks)}


def smallest_world(
    recipe: Recipe, cfg: ModelConfig, sizes: dict[str, int], stage_idx: int, gpu_gib: float = GPU_GIB
) -> int | None:
    """The smallest power-of-two world size whose batch divides and whose plan fits in ``gpu_gib``, or None."""
    for k in range(13):
        w = 2**k
        try:
            if plan_stage(recipe, cfg, sizes, stage_idx, w).fits(gpu_gib):
                return w
        except NestlmError:  # the global batch does not divide at this world size
            continue
    return None


def _context(k: int) -> str:
    return "" if k == 1 else f" as {k}-rank context groups (each sequence in {k} parts)"


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(recipe: Recipe, world: int, gpu_gib: float = GPU_GIB, unfit: list[str] | None = None) -> str:
    """The plan as text, for GPUs of ``gpu_gib`` GiB; the names of the stages that do not fit go to ``unfit``."""
    cfg = parent_config(recipe)
    sizes = model_sizes(cfg)
    tr = recipe.train
    lines = [
        f"memory plan of {recipe.name} per rank at world size {world} on {gpu_gib:g} GiB GPUs (a plan from "
        "formulas, not measured on a GPU)",
        f"parent: {sizes['total']:,} parameters, {cfg.n_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}; FSDP2 over {world} ranks{_context(tr.context_parallel)}; fp32 master weights, bf16 "
        f"compute; activation checkpointing {'on' if tr.activation_checkpointing else 'off'}; KD chunk "
        f"{tr.kd_chunk_tokens or 'none (whole micro-batch)'}",
    ]
    for si, stage in enumerate(recipe.stages):
        sp = plan_stage(recipe, cfg, sizes, si, world)
        b = sp.batching
        lines.append(
            f"stage {si + 1} {stage.name}: seq_len {stage.seq_len}, global batch {b.global_batch} = micro-batch "
            f"{b.micro_batch} x {b.accum} accumulation steps x "
            + (
                f"{world} ranks"
                if b.world == world
                else f"{b.world} data-parallel ranks (x {world // b.world} context)"
            )
        )
        lines += [f"  {k:<30}{_gib(v)}" for k, v in sp.parts.items()]
        verdict = "fits" if sp.fits(gpu_gib) else "does NOT fit"
        if unfit is not None and not sp.fits(gpu_gib):
            unfit.append(f"{si + 1} ({stage.name})")
        spare = f"keeping {RESERVE_GIB} GiB spare"
        lines.append(f"  {'total':<30}{_gib(sp.total)}  -> {verdict} in {gpu_gib:g} GiB ({spare})")
        w = smallest_world(recipe, cfg, sizes, si, gpu_gib)
        lines.append(
            f"  smallest power-of-two world size that fits: {w}"
            if w
            else "  fits at no world size: activations do not shard with FSDP (lower micro_batch or seq_len, or "
            "raise train.context_parallel)"
        )
    return "\n".join(lines)
