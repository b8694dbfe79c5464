"""Importance: calibration scores for every elastic axis, and the permutation into importance order.

Width scores come from forward passes only (the model's ``tap`` argument hands
over the activations); aggregation as Minitron does it: mean over the sequence,
L2 over the batch.
  hidden channel  sum over layers of |pre-norm output|
  MLP neuron      |activation| of the neuron (after the squared ReLU / SwiGLU gate)
  attention head  ||head output||_2 (the input of o_proj), ranked within its KV group;
                  a KV group scores the L2 of its query heads. Whole heads move, never the
                  channels inside one: RoPE pairs channel i with i + head_dim/2, and q/k
                  norms (Qwen3) share one weight per channel across heads
  Mamba channel   |x part of in_proj|; a head scores the L2 of its channels, and heads
                  are ranked within their group (B and C are per group, never pruned)
  routed expert   REAP: over the tokens routed to it, the mean of routing weight * ||expert
                  output||_2 (never routed: 0); ranked within its routing group
  expert neuron   mean |activation| over the tokens routed to its expert; ranked within
                  each expert (every expert is cut to the same width)
  shared neuron   as an MLP neuron
  depth           s_j = sum (M_full - M_-j)^2 / sum M_full^2 over logits M with layer j
                  skipped; the least important layer is removed and the rest re-scored
                  against the full model, until one is left (iterative ranking)
``reorder`` permutes the weights so that every smaller sub-network is a prefix;
the function of the full model does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NestlmError
from ..tap import Tap
from .arch import ArchSpec

if TYPE_CHECKING:
    from ..model import HybridLM


@dataclass
class Importance:
    """Scores of every elastic unit; higher = more important. ``layer_order``: least important first."""

    hidden: torch.Tensor  # (D,)
    layers: list[
        dict[str, torch.Tensor]
    ]  # per layer: mamba {head (H,), channel (H, P)}; attention {head, kv}; mlp {neuron}
    layer_order: list[int] = field(default_factory=list)
    depth_scores: list[float] = field(default_factory=list)  # score of each layer when it was removed
    n_samples: int = 0
    reordered: bool = False  # True once the weights are permuted so that scores are descending

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "reordered": self.reordered,
            "layer_order": self.layer_order,
            "depth_scores": self.depth_scores,
            "hidden": self.hidden.tolist(),
            "layers": [{k: v.tolist() for k, v in d.items()} for d in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Importance:
        return cls(
            hidden=torch.tensor(d["hidden"]),
            layers=[{k: torch.tensor(v) for k, v in layer.items()} for layer in d["layers"]],
            layer_order=list(d.get("layer_order", [])),
            depth_scores=list(d.get("depth_scores", [])),
            n_samples=d.get("n_samples", 0),
            reordered=d.get("reordered", False),
        )


def pick_device(name: str, what: str = "device") -> torch.device:
    """``auto`` (CUDA when present), ``cuda`` or ``cpu``; ``cuda`` without a GPU is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cuda", "cpu"):
        raise NestlmError(f"{what} {name!r} must be auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NestlmError(f"{what} cuda: no CUDA GPU is visible to torch here; use --device cpu or auto")
    return torch.device(name)


# the activations importance reads (Tap's names); "moe_*" are per-expert sums from model.run_experts
SCORED = ("norm", "mamba_x", "attn_out", "mlp_act", "moe_reap", "moe_expert_act")


class _Accumulator(Tap):
    """Sum over samples of (mean over sequence of |activation|)^2, per unit."""

    def __init__(self) -> None:
        self.sq: dict[tuple[int, str], torch.Tensor] = {}

    def activation(self, layer: int, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in SCORED:  # e.g. "mamba_heads": a mask slot for router training, not an activation
            return t
        out = t
        t = t.detach().float()
        if name.startswith("moe_"):  # per-expert sums over the routed tokens (see model.run_experts)
            key = (layer, name)
            self.sq[key] = self.sq[key] + t if key in self.sq else t
            return out
        if name == "attn_out":  # (B, L, nq*hd) -> per-head norm (B, L, nq)
            t = t.view(*t.shape[:2], -1, self._head_dim[layer]).norm(dim=-1)
        a = t.abs().mean(dim=1)  # mean over the sequence -> (B, units)
        s = a.pow(2).sum(dim=0)  # squares summed over the batch (L2 at the end)
        key = (layer, name)
        self.sq[key] = self.sq[key] + s if key in self.sq else s
        return out

    def score(self, layer: int, name: str) -> torch.Tensor:
        return self.sq[(layer, name)].sqrt()


def calibration_batches(
    tokens: torch.Tensor, seq_len: int, num_samples: int, batch_size: int, source: str = "the data"
) -> list[torch.Tensor]:
    """The first ``num_samples`` sequences of ``seq_len`` tokens of a token stream, in batches (B, T).

    The one calibration set-up of ``nestlm importance`` and the demo (training's automatic
    importance draws its batches from the run's own loader).
    """
    n_blocks = tokens.numel() // seq_len
    if n_blocks < 1:
        raise NestlmError(
            f"calibration data {source} has {tokens.numel()} tokens, fewer than one sequence of {seq_len}; "
            "give more data or a smaller --seq-len"
        )
    n = min(n_blocks, num_samples)
    return list(tokens[: n * seq_len].view(n, seq_len).split(batch_size))


def _materialize(batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.long, torch.int, torch.int32):
            raise NestlmError(f"calibration batch {i} must be a LongTensor (B, T) of token ids, got {type(b).__name__}")
        if b.shape[0] == 0 or b.shape[1] < 2:
            raise NestlmError(f"calibration batch {i} has shape {tuple(b.shape)}; each needs >= 1 row of >= 2 tokens")
        out.append(b.long())
    if not out:
        raise NestlmError("calibration data is empty; give at least one batch of token ids")
    return out


@torch.no_grad()
def estimate_importance(
    model: HybridLM,
    batches: Iterable[torch.Tensor],
    depth: bool = True,
    depth_batches: int | None = 4,
    progress: bool = True,
) -> Importance:
    """Score hidden channels, MLP neurons, attention and Mamba heads, and layers (iteratively).

    batches: iterable of LongTensor (B, T). depth_batches: how many of them score depth
    (each removal step runs one forward per remaining layer).
    """
    from tqdm.auto import tqdm

    from ..progress import show_progress

    progress = show_progress(progress)  # bars on a terminal only
    data = _materialize(batches)
    cfg = model.config
    was_training = model.training
    model.eval()
    acc = _Accumulator()
    acc._head_dim = {i: ls.head_dim for i, ls in enumerate(cfg.layers) if ls.kind == "attention"}
    device = model.embeddings.weight.device
    n = 0
    for b in tqdm(data, desc="importance: width", disable=not progress, unit="batch"):
        model(b.to(device), tap=acc, num_logits=1)
        n += b.shape[0]

    hidden = sum(acc.score(i, "norm") for i in range(cfg.n_layers))
    layers: list[dict[str, torch.Tensor]] = []
    for i, ls in enumerate(cfg.layers):
        if ls.kind == "mamba":
            ch = acc.score(i, "mamba_x").view(ls.heads, ls.head_dim)
            layers.append({"head": ch.norm(dim=1), "channel": ch})
        elif ls.kind == "attention":
            head = acc.score(i, "attn_out")
            kv = head.view(ls.heads // ls.kv_heads, ls.kv_heads).norm(dim=0)  # query head j is in KV group j % kv
            layers.append({"head": head, "kv": kv})
        elif ls.kind == "moe":
            reap = acc.sq.get((i, "moe_reap"), torch.zeros(2, ls.experts))
            count = reap[1].clamp(min=1)
            act = acc.sq.get((i, "moe_expert_act"), torch.zeros(ls.experts, ls.ffn))
            shared = acc.score(i, "mlp_act")
            layers.append({"expert": reap[0] / count, "expert_neuron": act / count[:, None], "neuron": shared})
        else:
            layers.append({"neuron": acc.score(i, "mlp_act")})
    imp = Importance(hidden=hidden.cpu(), layers=[{k: v.cpu() for k, v in d.items()} for d in layers], n_samples=n)
    if depth and cfg.n_layers > 1:
        imp.layer_order, imp.depth_scores = _depth_order(model, data[: depth_batches or len(data)], progress)
    model.train(was_training)
    return imp


def _depth_order(model: HybridLM, data: list[torch.Tensor], progress: bool) -> tuple[list[int], list[float]]:
    from tqdm.auto import tqdm

    cfg = model.config
    device = model.embeddings.weight.device
    full = ArchSpec.full(cfg)
    ref = [model(b.to(device)).logits for b in data]
    ref_sq = sum(float(r.pow(2).sum()) for r in ref)
    removed: list[int] = []
    scores: list[float] = []
    total = cfg.n_layers * (cfg.n_layers + 1) // 2 - 1  # n + (n - 1) + ... + 2 forwards
    with tqdm(total=total, desc="importance: depth", disable=not progress, unit="fwd") as bar:
        while len(removed) < cfg.n_layers - 1:
            best, best_s = -1, float("inf")
            for j in range(cfg.n_layers):
                if j in removed:
                    continue
                spec = full.replace(drop_layers=removed + [j])
                err = sum(
                    float((model(b.to(device), arch=spec).logits - r).pow(2).sum())
                    for b, r in zip(data, ref, strict=True)
                )
                s = err / max(ref_sq, 1e-30)
                if s < best_s:
                    best, best_s = j, s
                bar.update(1)
            removed.append(best)
            scores.append(best_s)
    last = next(j for j in range(cfg.n_layers) if j not in removed)
    return removed + [last], scores + [float("inf")]


# --------------------------------------------------------------------------- permutation
def _desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``scores`` descending; ties keep their original order."""
    return torch.sort(scores, descending=True, stable=True).indices


def _within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Permutation of rank-major heads (head j = r*G + g) ordering ranks within every group g."""
    R = scores.numel() // groups
    s = scores.view(R, groups)  # [r, g]
    ranks = torch.stack([_desc(s[:, g]) for g in range(groups)], dim=1)  # new rank r of group g = old rank
    return (ranks * groups + torch.arange(groups)[None]).reshape(-1)  # new head r*G+g <- old head


def _channels(head_perm: torch.Tensor, chan_perm: torch.Tensor) -> torch.Tensor:
    """Channel permutation for heads reordered by head_perm and, inside each, by chan_perm[old head]."""
    P = chan_perm.shape[1]
    return (head_perm[:, None] * P + chan_perm[head_perm]).reshape(-1)


@torch.no_grad()
def reorder(model: HybridLM, imp: Importance) -> HybridLM:
    """Permute ``model``'s weights in place into importance order; the function is unchanged.

    Returns the same model, with ``model.importance`` set to ``imp`` re-expressed in the
    new order (so every score list is descending).
    """
    cfg = model.config
    if imp.hidden.numel() != cfg.hidden_size or len(imp.layers) != cfg.n_layers:
        raise NestlmError("importance scores do not match this model's shape; estimate them on this model")
    ph = _desc(imp.hidden)

    def perm_(p: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
        p.data = p.data.index_select(dim, idx.to(p.device)).contiguous()

    perm_(model.embeddings.weight, 1, ph)
    if model.lm_head is not None:
        perm_(model.lm_head.weight, 1, ph)
    perm_(model.norm_f.weight, 0, ph)
    new_layers: list[dict[str, torch.Tensor]] = []
    for block, ls, sc in zip(model.layers, cfg.layers, imp.layers, strict=True):
        perm_(block.norm.weight, 0, ph)
        mx = block.mixer
        if ls.kind == "mamba":
            H, P = ls.heads, ls.head_dim
            hp = _within_groups(sc["head"], ls.groups)
            cp = torch.stack([_desc(sc["channel"][h]) for h in range(H)])  # (H, P)
            ch = _channels(hp, cp)
            HP, bc = H * P, 2 * ls.groups * ls.d_state
            rows = torch.cat([ch, HP + ch, 2 * HP + torch.arange(bc), 2 * HP + bc + hp])
            perm_(mx.in_proj.weight, 0, rows)
            perm_(mx.in_proj.weight, 1, ph)
            if mx.in_proj.bias is not None:
                perm_(mx.in_proj.bias, 0, rows)
            conv_rows = torch.cat([ch, HP + torch.arange(bc)])
            perm_(mx.conv1d.weight, 0, conv_rows)
            if mx.conv1d.bias is not None:
                perm_(mx.conv1d.bias, 0, conv_rows)
            for p in (mx.dt_bias, mx.A_log, mx.D):
                perm_(p, 0, hp)
            perm_(mx.norm.weight, 0, ch)
            perm_(mx.out_proj.weight, 1, ch)
            perm_(mx.out_proj.weight, 0, ph)
            if mx.out_proj.bias is not None:
                perm_(mx.out_proj.bias, 0, ph)
            chan = sc["channel"][hp]
            chan = torch.stack([chan[h][cp[hp[h]]] for h in range(H)])
            new_layers.append({"head": sc["head"][hp], "channel": chan})
        elif ls.kind == "attention":
            nkv, hd = ls.kv_heads, ls.head_dim
            R = ls.heads // nkv
            pk = _desc(sc["kv"])  # new KV head g' <- old pk[g']
            s = sc["head"].view(R, nkv)[:, pk]  # [r, new g']
            ranks = torch.stack([_desc(s[:, g]) for g in range(nkv)], dim=1)  # new rank <- old rank
            hq = (ranks * nkv + pk[None]).reshape(-1)  # new head r*nkv + g' <- old head
            qch = (hq[:, None] * hd + torch.arange(hd)[None]).reshape(-1)
            kvch = (pk[:, None] * hd + torch.arange(hd)[None]).reshape(-1)
            perm_(mx.q_proj.weight, 0, qch)
            perm_(mx.k_proj.weight, 0, kvch)
            perm_(mx.v_proj.weight, 0, kvch)
            for lin in (mx.q_proj, mx.k_proj, mx.v_proj):
                perm_(lin.weight, 1, ph)
            if mx.q_proj.bias is not None:
                perm_(mx.q_proj.bias, 0, qch)
                perm_(mx.k_proj.bias, 0, kvch)
                perm_(mx.v_proj.bias, 0, kvch)
            if mx.o_proj.bias is not None:
                perm_(mx.o_proj.bias, 0, ph)
            perm_(mx.o_proj.weight, 1, qch)
            perm_(mx.o_proj.weight, 0, ph)
            new_layers.append({"head": sc["head"][hq], "kv": sc["kv"][pk]})
        elif ls.kind == "moe":
            new_layers.append(_reorder_moe(mx, sc, ph, cfg.moe_n_group, perm_))
        else:
            pf = _desc(sc["neuron"])
            lins = [mx.up_proj] + ([mx.gate_proj] if hasattr(mx, "gate_proj") else [])
            for lin in lins:
                perm_(lin.weight, 0, pf)
                perm_(lin.weight, 1, ph)
                if lin.bias is not None:
                    perm_(lin.bias, 0, pf)
            perm_(mx.down_proj.weight, 1, pf)
            perm_(mx.down_proj.weight, 0, ph)
            if mx.down_proj.bias is not None:
                perm_(mx.down_proj.bias, 0, ph)
            new_layers.append({"neuron": sc["neuron"][pf]})
    model.importance = dataclasses.replace(imp, hidden=imp.hidden[ph], layers=new_layers, reordered=True)
    return model


def _reorder_moe(mx: Any, sc: dict[str, torch.Tensor], ph: torch.Tensor, n_group: int, perm_: Any) -> dict:
    """Experts by REAP within their group (router rows and selection bias move with them), each
    expert's neurons by activation, the shared expert's neurons as an MLP's; hidden channels by ``ph``."""
    E = sc["expert"].numel()
    R = E // n_group  # experts per group, group-major
    pe = torch.cat([g * R + _desc(sc["expert"][g * R : (g + 1) * R]) for g in range(n_group)])
    perm_(mx.gate.weight, 0, pe)
    perm_(mx.gate.e_score_correction_bias, 0, pe)
    perm_(mx.gate.weight, 1, ph)
    up, down = mx.experts.up_proj, mx.experts.down_proj  # (E, F, D), (E, D, F)
    perm_(up, 0, pe)
    perm_(down, 0, pe)
    perm_(up, 2, ph)
    perm_(down, 1, ph)
    neuron = sc["expert_neuron"][pe]
    pn = torch.stack([_desc(row) for row in neuron])  # (E, F): new neuron <- old, per expert
    up.data = up.data.gather(1, pn[:, :, None].expand(-1, -1, up.shape[2]).to(up.device)).contiguous()
    down.data = down.data.gather(2, pn[:, None, :].expand(-1, down.shape[1], -1).to(down.device)).contiguous()
    sh = mx.shared_experts
    pf = _desc(sc["neuron"])
    perm_(sh.up_proj.weight, 0, pf)
    perm_(sh.up_proj.weight, 1, ph)
    perm_(sh.down_proj.weight, 1, pf)
    perm_(sh.down_proj.weight, 0, ph)
    if sh.up_proj.bias is not None:
        perm_(sh.up_proj.bias, 0, pf)
        perm_(sh.down_proj.bias, 0, ph)
    return {"expert": sc["expert"][pe], "expert_neuron": neuron.gather(1, pn), "neuron": sc["neuron"][pf]}


def require_reordered(model: HybridLM, what: str) -> Importance:
    """The model's importance, or a clear error if it was never ranked and reordered."""
    imp = getattr(model, "importance", None)
    if imp is None or not imp.reordered:
        src = model.source_dir or "this model"
        raise NestlmError(
            f"{what} needs a model reordered by importance, and {src} has no importance ranking; "
            f"run `nestlm importance --model {src} --data DATA --out DIR` first and use DIR"
        )
    return imp
