"""NemotronH (hybrid Mamba2 / attention / MLP or MoE) with nested budgets, written by ``nestlm export-hf``.

``NestedNemotronHForCausalLM`` is transformers' NemotronHForCausalLM plus budgets (see nested.py): with
``budget=None`` it is that class, unchanged; with a budget, each kept layer runs on views of the full weights, the
Mamba scan and conv through transformers' own functions and cache layers (one per parent layer: a dropped layer
is an identity whose cache layer stays empty). This file imports only torch and transformers.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.nemotron_h.modeling_nemotron_h import (
    apply_mask_to_padding_states,
    causal_conv1d_forward,
    mamba2_scan_forward,
)

from .configuration_nestlm import NestedNemotronHConfig
from .nested import (
    NestedMixin,
    attention,
    lin_cols,
    lin_rows,
    load_plain,
    mlp,
    plain_config_dict,
    query_runs,
    rms_norm,
    runs,
    same_widths,
    seen_tokens,
    shift,
    take,
    units,
)

TYPES = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}


# --------------------------------------------------------------------------------- which rows a layer keeps
def mamba_runs(mx, a):
    """Runs of a Mamba layer: (head channels of z or x, heads, in_proj rows, conv rows)."""
    G, R, P = mx.n_groups, mx.num_heads // mx.n_groups, mx.head_dim
    I, GN = mx.intermediate_size, mx.n_groups * mx.ssm_state_size
    ch = runs(G, R, a["heads"] // G, P, a["head_dim"])  # order: [z, x, B, C, dt]
    heads = runs(G, R, a["heads"] // G)
    rows = ch + shift(ch, I) + [(2 * I, 2 * GN)] + shift(heads, 2 * I + 2 * GN)
    return ch, heads, rows, ch + [(I, 2 * GN)]


def expert_runs(cfg, a):
    per = cfg.n_routed_experts // cfg.n_group
    return runs(cfg.n_group, per, a["experts"] // cfg.n_group)


# --------------------------------------------------------------------------------------------- the mixers
def mamba(mx, x, a, cache, pad):
    """A Mamba2 mixer at widths ``a``: in_proj -> causal conv -> SSD scan (transformers', with its cache) ->
    gated group norm -> out_proj, the projections on views of the full weights."""
    D = x.shape[-1]
    ch, heads, _, conv_rows = mamba_runs(mx, a)
    H, p, G, GN, I = a["heads"], a["head_dim"], mx.n_groups, mx.n_groups * mx.ssm_state_size, mx.intermediate_size
    W, b = mx.in_proj.weight, mx.in_proj.bias
    x = apply_mask_to_padding_states(x, pad)
    z = lin_rows(x, W, b, ch, D)
    xbc = torch.cat([lin_rows(x, W, b, shift(ch, I), D), lin_rows(x, W, b, [(2 * I, 2 * GN)], D)], dim=-1)
    dt = lin_rows(x, W, b, shift(heads, 2 * I + 2 * GN), D)
    cb = mx.conv1d.bias
    conv = SimpleNamespace(weight=take(mx.conv1d.weight, conv_rows), kernel_size=mx.conv1d.kernel_size)
    conv.bias = None if cb is None else take(cb, conv_rows)
    xbc = causal_conv1d_forward(conv, xbc.transpose(1, 2), cache, mx.layer_idx, activation=mx.activation)
    xbc = apply_mask_to_padding_states(xbc.transpose(1, 2), pad)
    xs, Bm, Cm = torch.split(xbc, [H * p, GN, GN], dim=-1)
    scan = SimpleNamespace(
        A_log=take(mx.A_log, heads),
        D=take(mx.D, heads),
        dt_bias=take(mx.dt_bias, heads),
        num_heads=H,
        head_dim=p,
        n_groups=G,
        ssm_state_size=mx.ssm_state_size,
        chunk_size=mx.chunk_size,
        time_step_limit=mx.time_step_limit,
        layer_idx=mx.layer_idx,
        intermediate_size=H * p,
    )
    y = mamba2_scan_forward(scan, xs, Bm, Cm, dt, cache)
    # NemotronHRMSNormGated over each group's kept channels (heads are group-major: a group is contiguous)
    dtype = y.dtype
    h = y.float() * F.silu(z.float())
    hg = h.view(*h.shape[:-1], G, -1)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + mx.norm.variance_epsilon)
    y = take(mx.norm.weight, ch) * hg.view(h.shape).to(dtype)
    return lin_cols(y.to(x.dtype), mx.out_proj.weight, mx.out_proj.bias, ch, D)


def moe(mx, x, a, cfg):
    """NemotronH MoE at widths ``a``: the router over the kept experts (fp32 sigmoid scores, selection bias,
    group-limited top-k), each kept expert's first ``ffn`` neurons, plus the shared expert's first ``shared_ffn``."""
    B, L, D = x.shape
    er = expert_runs(cfg, a)
    ids = units(er)
    t = x.reshape(-1, D)
    scores = lin_rows(t.float(), mx.gate.weight, None, er, D).sigmoid()  # (T, E')
    choice = scores + take(mx.gate.e_score_correction_bias, er).float()
    if cfg.topk_group < cfg.n_group:
        grouped = choice.view(-1, cfg.n_group, len(ids) // cfg.n_group)
        best = grouped.topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, len(ids))
    index = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]  # (T, k), into the kept experts
    w = scores.gather(1, index)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    f, up, down, act = a["ffn"], mx.experts.up_proj, mx.experts.down_proj, mx.experts.act_fn
    out = torch.zeros_like(t)
    for j in torch.unique(index).tolist():  # the experts some token chose (one host sync)
        tok, slot = torch.where(index == j)
        h = act(F.linear(t[tok], up[ids[j], :f, :D]))
        y = F.linear(h, down[ids[j], :D, :f]) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out.view(B, L, D) + mlp(mx.shared_experts, x, a["shared_ffn"], mx.shared_experts.act_fn)


class NestedNemotronHForCausalLM(NestedMixin, NemotronHForCausalLM):
    """transformers' NemotronHForCausalLM with nested budgets: ``budget=`` in forward, generate, save_pretrained."""

    config_class = NestedNemotronHConfig

    def _budget_forward(self, arch, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kw):
        cfg, m = self.config, self.model
        D = arch["hidden"]
        if kw.get("inputs_embeds") is not None:
            h = kw["inputs_embeds"][..., :D]
        else:
            h = F.embedding(input_ids, m.embeddings.weight[:, :D])
        if position_ids is None:
            past = seen_tokens(cache)
            position_ids = (torch.arange(h.shape[1], device=h.device) + past)[None]
        attn = [i for i, a in enumerate(arch["layers"]) if a is not None and a["kind"] == "attention"]
        mask_args = dict(config=cfg, inputs_embeds=h, attention_mask=attention_mask, cache=cache)
        mask = create_causal_mask(**mask_args, position_ids=position_ids, layer_idx=attn[0]) if attn else None
        pad = create_recurrent_attention_mask(**mask_args)
        act = ACT2FN[cfg.mlp_hidden_act]
        for block, a in zip(m.layers, arch["layers"], strict=True):
            if a is None:  # a dropped layer is the identity; its cache layer stays empty
                continue
            x = rms_norm(h.to(block.norm.weight.dtype), block.norm.weight[:D], block.norm.variance_epsilon, True)
            kind = a["kind"]
            if kind == "mamba":
                out = mamba(block.mixer, x, a, cache, pad)
            elif kind == "attention":
                out = attention(block.mixer, x, a, cache, mask)
            elif kind == "moe":
                out = moe(block.mixer, x, a, cfg)
            else:
                out = mlp(block.mixer, x, a["ffn"], act)
            h = h + out
        h = rms_norm(h, m.norm_f.weight[:D], m.norm_f.variance_epsilon, True)
        logits = F.linear(slice_logits_to_keep(h, kw.get("logits_to_keep", 0)), self.lm_head.weight[:, :D]).float()
        loss = None
        if kw.get("labels") is not None:
            loss = self.loss_function(logits, kw["labels"], self.vocab_size)
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if kw.get("use_cache") else None)

    def _standalone(self, arch):
        """A plain NemotronHForCausalLM holding a copy of the budget's weights (kept layers only)."""
        cfg, m = self.config, self.model
        D = arch["hidden"]
        kept = [(i, a) for i, a in enumerate(arch["layers"]) if a is not None]
        w = same_widths(arch, ("mamba", "attention", "mlp", "moe"))
        changes = dict(hidden_size=D, layers_block_type=[TYPES[a["kind"]] for _, a in kept])
        changes["num_hidden_layers"] = len(kept)
        if "mamba" in w:
            changes.update(mamba_num_heads=w["mamba"]["heads"], mamba_head_dim=w["mamba"]["head_dim"])
        if "attention" in w:
            changes.update(num_attention_heads=w["attention"]["heads"], num_key_value_heads=w["attention"]["kv_heads"])
        if "mlp" in w:
            changes["intermediate_size"] = w["mlp"]["ffn"]
        if "moe" in w:
            e = w["moe"]
            changes.update(n_routed_experts=e["experts"], moe_intermediate_size=e["ffn"])
            changes["moe_shared_expert_intermediate_size"] = e["shared_ffn"]
        if kept[0][1]["kind"] in ("mlp", "moe"):  # transformers 5.25 runs such a model only without its cache
            changes["use_cache"] = False
        sd = {
            "model.embeddings.weight": m.embeddings.weight[:, :D],
            "model.norm_f.weight": m.norm_f.weight[:D],
            "lm_head.weight": self.lm_head.weight[:, :D],
        }
        for j, (i, a) in enumerate(kept):
            block, pre = m.layers[i], f"model.layers.{j}."
            sd[pre + "norm.weight"] = block.norm.weight[:D]
            sd.update({pre + "mixer." + k: v for k, v in _layer_state(block.mixer, a, D, cfg).items()})
        sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        config = NemotronHConfig(**plain_config_dict(cfg, **changes))
        return load_plain(NemotronHForCausalLM, config, sd)


def _layer_state(mx, a, D, cfg):
    """The budget's copy of one mixer's weights, named as the plain mixer names them."""
    sd = {}

    def rows(name, t, rs, cols=None):
        sd[name] = take(t if cols is None else t[:, :cols], rs)

    if a["kind"] == "mamba":
        ch, heads, in_rows, conv_rows = mamba_runs(mx, a)
        rows("in_proj.weight", mx.in_proj.weight, in_rows, D)
        rows("conv1d.weight", mx.conv1d.weight, conv_rows)
        for name in ("dt_bias", "A_log", "D"):
            rows(name, getattr(mx, name), heads)
        rows("norm.weight", mx.norm.weight, ch)
        sd["out_proj.weight"] = take(mx.out_proj.weight[:D], ch, dim=1)
        opt = {"in_proj.bias": (mx.in_proj.bias, in_rows), "conv1d.bias": (mx.conv1d.bias, conv_rows)}
        opt["out_proj.bias"] = (mx.out_proj.bias, [(0, D)])
        for name, (t, rs) in opt.items():
            if t is not None:
                rows(name, t, rs)
    elif a["kind"] == "attention":
        q, kv = query_runs(mx, a), [(0, a["kv_heads"] * mx.head_dim)]
        rows("q_proj.weight", mx.q_proj.weight, q, D)
        rows("k_proj.weight", mx.k_proj.weight, kv, D)
        rows("v_proj.weight", mx.v_proj.weight, kv, D)
        sd["o_proj.weight"] = take(mx.o_proj.weight[:D], q, dim=1)
    elif a["kind"] == "moe":
        er = expert_runs(cfg, a)
        rows("gate.weight", mx.gate.weight, er, D)
        rows("gate.e_score_correction_bias", mx.gate.e_score_correction_bias, er)
        sd["experts.up_proj"] = take(mx.experts.up_proj, er)[:, : a["ffn"], :D]
        sd["experts.down_proj"] = take(mx.experts.down_proj, er)[:, :D, : a["ffn"]]
        sd.update({"shared_experts." + k: v for k, v in _mlp_state(mx.shared_experts, a["shared_ffn"], D).items()})
    else:
        sd.update(_mlp_state(mx, a["ffn"], D))
    return sd


def _mlp_state(m, f, D):
    sd = {"up_proj.weight": m.up_proj.weight[:f, :D], "down_proj.weight": m.down_proj.weight[:D, :f]}
    if m.up_proj.bias is not None:
        sd.update({"up_proj.bias": m.up_proj.bias[:f], "down_proj.bias": m.down_proj.bias[:D]})
    return sd
