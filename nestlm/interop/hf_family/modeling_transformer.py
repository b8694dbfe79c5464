"""Llama, Mistral, Qwen2 and Qwen3 with nested budgets, written by ``nestlm export-hf``.

Each class is the family's transformers ForCausalLM plus budgets (see nested.py): with ``budget=None`` it is that
class, unchanged. A budget's architecture lists two blocks per decoder layer, as nestlm trains them: block 2i the
attention (with input_layernorm), block 2i+1 the MLP (with post_attention_layernorm); either may be dropped (an
identity), and the kept ones run on views of the full weights with transformers' RoPE and cache. This file
imports only torch and transformers.
"""

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .configuration_nestlm import NestedLlamaConfig, NestedMistralConfig, NestedQwen2Config, NestedQwen3Config
from .nested import (
    NestedMixin,
    attention,
    load_plain,
    mlp,
    plain_config_dict,
    query_runs,
    rms_norm,
    same_widths,
    seen_tokens,
    take,
)


class TransformerBudgets(NestedMixin):
    """The budget forward and the standalone slice of a Transformer family (mixed in before its class)."""

    def _budget_forward(self, arch, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kw):
        cfg, m = self.config, self.model
        D, blocks = arch["hidden"], arch["layers"]
        if kw.get("inputs_embeds") is not None:
            h = kw["inputs_embeds"][..., :D]
        else:
            h = F.embedding(input_ids, m.embed_tokens.weight[:, :D])
        if position_ids is None:
            position_ids = (torch.arange(h.shape[1], device=h.device) + seen_tokens(cache))[None]
        attn = [i // 2 for i, a in enumerate(blocks) if a is not None and a["kind"] == "attention"]
        mask = None
        if attn:  # sized by the first kept attention layer's cache (a dropped layer's stays empty)
            mask_args = dict(config=cfg, inputs_embeds=h, attention_mask=attention_mask, cache=cache)
            mask = create_causal_mask(**mask_args, position_ids=position_ids, layer_idx=attn[0])
        rope = m.rotary_emb(h, position_ids=position_ids)
        act = ACT2FN[cfg.hidden_act]
        for i, layer in enumerate(m.layers):
            a, f = blocks[2 * i], blocks[2 * i + 1]
            if a is not None:
                norm = layer.input_layernorm
                x = rms_norm(h, norm.weight[:D], norm.variance_epsilon, False)
                h = h + attention(layer.self_attn, x, a, cache, mask, rope, apply_rotary_pos_emb)
            if f is not None:
                norm = layer.post_attention_layernorm
                x = rms_norm(h, norm.weight[:D], norm.variance_epsilon, False)
                h = h + mlp(layer.mlp, x, f["ffn"], act)
        h = rms_norm(h, m.norm.weight[:D], m.norm.variance_epsilon, False)
        logits = F.linear(slice_logits_to_keep(h, kw.get("logits_to_keep", 0)), self.lm_head.weight[:, :D]).float()
        loss = None
        if kw.get("labels") is not None:
            loss = self.loss_function(logits, kw["labels"], self.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if kw.get("use_cache") else None)

    def _standalone(self, arch):
        """A plain model of the family holding a copy of the budget's weights (kept decoder layers only)."""
        cfg, m = self.config, self.model
        D, blocks = arch["hidden"], arch["layers"]
        pairs = [(blocks[2 * i], blocks[2 * i + 1]) for i in range(len(blocks) // 2)]
        if any((a is None) != (f is None) for a, f in pairs):
            raise ValueError(
                "this budget keeps the attention or the MLP of a decoder layer without the other; the plain family "
                "format has whole layers only, so it can run only as a budget of this model (budget=...)"
            )
        kept = [i for i, (a, _) in enumerate(pairs) if a is not None]
        w = same_widths(arch, ("attention", "mlp"))
        at, ffn = w["attention"], w["mlp"]["ffn"]
        changes = dict(hidden_size=D, num_hidden_layers=len(kept), intermediate_size=ffn, head_dim=at["head_dim"])
        changes.update(num_attention_heads=at["heads"], num_key_value_heads=at["kv_heads"])
        if getattr(cfg, "layer_types", None) is not None:
            changes["layer_types"] = ["full_attention"] * len(kept)
        sd = {"model.embed_tokens.weight": m.embed_tokens.weight[:, :D], "model.norm.weight": m.norm.weight[:D]}
        sd["lm_head.weight"] = self.lm_head.weight[:, :D]
        for j, i in enumerate(kept):
            layer, pre = m.layers[i], f"model.layers.{j}."
            sa, q, kv = layer.self_attn, query_runs(layer.self_attn, at), [(0, at["kv_heads"] * at["head_dim"])]
            sd[pre + "input_layernorm.weight"] = layer.input_layernorm.weight[:D]
            sd[pre + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight[:D]
            for name, rs in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                sd[pre + f"self_attn.{name}.weight"] = take(getattr(sa, name).weight[:, :D], rs)
                if getattr(sa, name).bias is not None:
                    sd[pre + f"self_attn.{name}.bias"] = take(getattr(sa, name).bias, rs)
            sd[pre + "self_attn.o_proj.weight"] = take(sa.o_proj.weight[:D], q, dim=1)
            if sa.o_proj.bias is not None:
                sd[pre + "self_attn.o_proj.bias"] = sa.o_proj.bias[:D]
            if hasattr(sa, "q_norm"):  # per head: never sliced (head_dim is not elastic)
                sd[pre + "self_attn.q_norm.weight"] = sa.q_norm.weight
                sd[pre + "self_attn.k_norm.weight"] = sa.k_norm.weight
            for name in ("gate_proj", "up_proj"):
                lin = getattr(layer.mlp, name)
                sd[pre + f"mlp.{name}.weight"] = lin.weight[:ffn, :D]
                if lin.bias is not None:
                    sd[pre + f"mlp.{name}.bias"] = lin.bias[:ffn]
            sd[pre + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight[:D, :ffn]
            if layer.mlp.down_proj.bias is not None:
                sd[pre + "mlp.down_proj.bias"] = layer.mlp.down_proj.bias[:D]
        sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        config = self._plain_config(**plain_config_dict(cfg, **changes))
        model = load_plain(self._plain_class, config, sd)
        model.model.rotary_emb = type(m.rotary_emb)(config=config)  # its inverse frequencies are not weights
        return model.to(m.embed_tokens.weight.device)


class NestedLlamaForCausalLM(TransformerBudgets, LlamaForCausalLM):
    """transformers' LlamaForCausalLM with nested budgets: ``budget=`` in forward, generate, save_pretrained."""

    config_class = NestedLlamaConfig
    _plain_class, _plain_config = LlamaForCausalLM, LlamaConfig


class NestedMistralForCausalLM(TransformerBudgets, MistralForCausalLM):
    """transformers' MistralForCausalLM with nested budgets."""

    config_class = NestedMistralConfig
    _plain_class, _plain_config = MistralForCausalLM, MistralConfig


class NestedQwen2ForCausalLM(TransformerBudgets, Qwen2ForCausalLM):
    """transformers' Qwen2ForCausalLM with nested budgets."""

    config_class = NestedQwen2Config
    _plain_class, _plain_config = Qwen2ForCausalLM, Qwen2Config


class NestedQwen3ForCausalLM(TransformerBudgets, Qwen3ForCausalLM):
    """transformers' Qwen3ForCausalLM with nested budgets."""

    config_class = NestedQwen3Config
    _plain_class, _plain_config = Qwen3ForCausalLM, Qwen3Config
