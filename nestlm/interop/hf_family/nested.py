"""What every family of a nestlm elastic export shares: budgets, weight views, the cache, the mixin.

A budget is a nested sub-network of the full model, frozen at training time and listed in config.json under
``nestlm_budgets`` (name -> {"arch": {"hidden": D, "layers": [per parent layer: its active widths, or null for a
dropped layer]}, "params": exact total, "active_params": exact per-token count, ...}). The weights are stored in
the parent family's own layout, in importance order, so a budget keeps:

* the first ``hidden`` channels of the residual stream;
* per Mamba layer, the first ``heads / n_groups`` heads of every group (and the first ``head_dim`` channels of
  each), B and C whole; per attention layer, the first ``kv_heads`` KV heads and the first
  ``heads / kv_heads`` query heads of each of their groups;
* the first ``ffn`` MLP neurons; per MoE layer the first ``experts / n_group`` experts of every routing group,
  the first ``ffn`` neurons of each, the first ``shared_ffn`` of the shared expert.

Heads are stored group-major, so the kept rows of a projection are a few contiguous runs (one per group), not one
prefix: a budget runs one GEMM per run on views of the full weights (no copy of a weight matrix, no mask). Only
the per-head vectors and the depthwise conv kernel (a few thousand numbers per layer) are gathered.

This file imports only torch and transformers.
"""

import os
import shutil
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

BUDGETS_KEY = "nestlm_budgets"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# ------------------------------------------------------------------------------------------- weight views
def runs(n_groups, per_group, kept, width=1, kept_width=None, offset=0):
    """(start, length) row runs of the first ``kept`` units of each of ``n_groups`` groups of ``per_group`` units,
    each unit ``width`` rows of which the first ``kept_width`` are kept; adjacent runs merged."""
    kw = width if kept_width is None else kept_width
    out = []
    for g in range(n_groups):
        units = [(g * per_group, kept)] if kw == width else [(g * per_group + r, 1) for r in range(kept)]
        for u, n in units:
            start, length = offset + u * width, (n * width if kw == width else kw)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out


def shift(rs, offset):
    return [(s + offset, n) for s, n in rs]


def lin_rows(x, weight, bias, rs, dim):
    """x @ W[rows, :dim].T (+ bias[rows]) for the rows of runs ``rs``: one GEMM per run, on views."""
    outs = [F.linear(x, weight[s : s + n, :dim], None if bias is None else bias[s : s + n]) for s, n in rs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def lin_cols(y, weight, bias, rs, dim):
    """y @ W[:dim, cols].T (+ bias[:dim]) for the columns of runs ``rs`` (y holds them in order): one GEMM per run."""
    out, at = None, 0
    for s, n in rs:
        part = F.linear(y[..., at : at + n], weight[:dim, s : s + n])
        out = part if out is None else out + part
        at += n
    return out if bias is None else out + bias[:dim]


def take(t, rs, dim=0):
    """The rows of runs ``rs`` along ``dim``, gathered (small tensors only: per-head vectors, conv kernels)."""
    parts = [t.narrow(dim, s, n) for s, n in rs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def units(rs):
    """Unit indices (e.g. experts) covered by runs of width 1."""
    return [i for s, n in rs for i in range(s, s + n)]


def rms_norm(x, weight, eps, weight_in_fp32):
    """RMSNorm over the last dimension as the family computes it (NemotronH: the weight in fp32; Llama: after the
    cast back)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(dtype) if weight_in_fp32 else weight * h.to(dtype)


# ------------------------------------------------------------------------------------------- the mixers
def query_runs(at, a):
    """q_proj rows (o_proj columns) of the kept query heads: the first heads/kv_heads of each kept KV group."""
    kv = a["kv_heads"]
    return runs(kv, at.num_key_value_groups, a["heads"] // kv, at.head_dim)


def attention(at, x, a, cache, mask, position_embeddings=None, apply_rope=None):
    """Grouped-query attention at widths ``a``: kept query heads per kept KV group, on views of the weights."""
    B, L, D = x.shape
    hd, q_rows = at.head_dim, query_runs(at, a)
    kv_rows = [(0, a["kv_heads"] * hd)]
    q = lin_rows(x, at.q_proj.weight, at.q_proj.bias, q_rows, D).view(B, L, -1, hd)
    k = lin_rows(x, at.k_proj.weight, at.k_proj.bias, kv_rows, D).view(B, L, -1, hd)
    v = lin_rows(x, at.v_proj.weight, at.v_proj.bias, kv_rows, D).view(B, L, -1, hd).transpose(1, 2)
    if hasattr(at, "q_norm"):  # Qwen3: RMSNorm over each head's channels
        q, k = at.q_norm(q), at.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if apply_rope is not None:
        q, k = apply_rope(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, at.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(at.config._attn_implementation, eager_attention_forward)
    view = SimpleNamespace(
        num_key_value_groups=a["heads"] // a["kv_heads"], is_causal=True, training=False, config=at.config
    )
    view.layer_idx, view.head_dim, view.scaling = at.layer_idx, hd, at.scaling
    out, _ = interface(view, q, k, v, mask, dropout=0.0, scaling=at.scaling)
    return lin_cols(out.reshape(B, L, -1), at.o_proj.weight, at.o_proj.bias, q_rows, D)


def mlp(m, x, ffn, act):
    """up -> act -> down on the first ``ffn`` neurons (a gate_proj too where the family has one)."""
    D, rows = x.shape[-1], [(0, ffn)]
    h = lin_rows(x, m.up_proj.weight, m.up_proj.bias, rows, D)
    if hasattr(m, "gate_proj"):
        h = act(lin_rows(x, m.gate_proj.weight, m.gate_proj.bias, rows, D)) * h
    else:
        h = act(h)
    return lin_cols(h, m.down_proj.weight, m.down_proj.bias, rows, D)


# ------------------------------------------------------------------------------------------------- cache
class NestedCache(DynamicCache):
    """transformers' DynamicCache, one layer per parent layer, whose length is the longest any layer has seen.

    A budget leaves the cache layers of its dropped layers empty (and an MLP or MoE layer has a DummyLayer,
    without a length), so "the length of layer 0" is not the length of the sequence; everything else is
    DynamicCache's (layers sized lazily: a budget's Mamba states and KV heads are its own widths).
    """

    def get_seq_length(self, layer_idx=0):
        return seen_tokens(self)


def seen_tokens(cache):
    """Tokens the cache holds: the most any layer has seen (dropped layers and DummyLayers have none)."""
    if cache is None:
        return 0
    seen = [int(layer.get_seq_length()) for layer in cache.layers if hasattr(layer, "get_seq_length")]
    return max(seen, default=0)


_UNSET = object()


def claim(cache, budget):
    """Mark ``cache`` as holding budget ``budget``'s state; a cache filled at another budget is an error."""
    if cache is None:
        return
    held = getattr(cache, "_nestlm_budget", _UNSET)
    if held is _UNSET:
        cache._nestlm_budget = budget
    elif held != budget:
        raise ValueError(
            f"this cache holds the state of budget {held!r} (None: the full model); budget {budget!r} needs its own "
            "cache (its layers have other widths)"
        )


# ------------------------------------------------------------------------------------------------- mixin
class NestedMixin:
    """Budgets over a transformers causal LM (mixed in before the family's class).

    ``model(input_ids, budget="6b")``, ``model.generate(..., budget="6b")`` (transformers' own loop and caches,
    greedy or sampling) and ``model.save_pretrained(dir, budget="6b")`` (a plain standalone directory of the
    family). ``budget=None`` is the full model, run by the family's own forward. The family class supplies
    ``_budget_forward(arch, ...)`` and ``_standalone(arch)``.
    """

    @property
    def budgets(self):
        """Names of the nested budgets, in the order config.json lists them."""
        return list(getattr(self.config, BUDGETS_KEY, None) or {})

    def budget_info(self, budget):
        """The record of budget ``budget``: arch, params (exact), active_params, fraction, target."""
        table = getattr(self.config, BUDGETS_KEY, None) or {}
        if budget not in table:
            known = ", ".join(repr(b) for b in table) or "none"
            raise ValueError(f"unknown budget {budget!r}; known budgets: {known}")
        return table[budget]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        budget=None,
        **kwargs,
    ):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        args.update(inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep)
        if budget is None:
            claim(cache, None)
            return super().forward(**args, **kwargs)
        arch = self.budget_info(budget)["arch"]
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = NestedCache(config=self.config.get_text_config(decoder=True))
        claim(cache, budget)
        args.update(cache=cache if use_cache else None, use_cache=use_cache)
        return self._budget_forward(arch, **args, **kwargs)

    def generate(self, *args, budget=None, **kwargs):
        """transformers' generate; ``budget`` names a nested budget (None: the full model)."""
        if budget is not None:
            self.budget_info(budget)  # an unknown name fails here, before any work
            kwargs["budget"] = budget
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if type(model_kwargs.get("cache")) is DynamicCache:  # the default: the same cache, with a budget's length
            model_kwargs["cache"] = NestedCache(config=self.config.get_text_config(decoder=True))

    def save_pretrained(self, save_directory, *args, budget=None, **kwargs):
        """transformers' save_pretrained; with ``budget``, that budget alone as a plain directory of the family
        (its own config and weights, no custom code, no other budget), tokenizer files included."""
        if budget is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        plain = self._standalone(self.budget_info(budget)["arch"])
        plain.generation_config = self.generation_config
        if not getattr(plain.config, "use_cache", True):
            plain.generation_config.use_cache = False
        plain.save_pretrained(save_directory, *args, **kwargs)
        src = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
        if src and os.path.isdir(src):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(save_directory, name))
        return None


def plain_config_dict(config, **changes):
    """The family's own config dict for a standalone model: without budgets, custom code or architectures."""
    d = config.to_dict()
    own = [k for k in d if k.startswith("nestlm_")]  # the family's budgets and parent record
    for key in own + ["auto_map", "architectures", "transformers_version", "_name_or_path", "model_type"]:
        d.pop(key, None)
    d.update(changes)
    return d


def same_widths(arch, kinds):
    """The one width record of every kept layer of each kind (the plain family format has one per kind)."""
    seen = {}
    for a in arch["layers"]:
        if a is None or a["kind"] not in kinds:
            continue
        if seen.setdefault(a["kind"], a) != a:
            raise ValueError(
                f"this budget has different {a['kind']} widths in different layers; the plain family format has one "
                "width per layer kind, so it can run only as a budget of this model (budget=...)"
            )
    return seen


def load_plain(plain_cls, config, state):
    """A plain family model holding ``state`` (built on the meta device, so nothing is initialised twice)."""
    with torch.device("meta"):
        model = plain_cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
