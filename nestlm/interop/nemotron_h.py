"""Hugging Face NemotronH <-> nestlm.

Weight names match after the prefix (``backbone.`` in files, ``model.`` in memory
for transformers; none in nestlm). The one real difference is head order: Hugging
Face stores Mamba heads group-major (head h reads group h // (H/G)) and query heads
KV-group-major, nestlm rank-major (head j reads group j % G). Load permutes, export
permutes back, so a round trip is bit-identical.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import atomic_dir, check_state_dict, copy_tokenizer, read_safetensors, write_json
from ..config import ConfigError, LayerSpec, ModelConfig, decode_float, encode_float
from ..errors import CheckpointError
from ..model import HybridLM
from ..tokenizer import write_hf_tokenizer
from .probe import transformers_fails_first_layer, transformers_version

HF_KIND = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}
NESTLM_TO_HF_KIND = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
LEGACY = {  # older NemotronH config.json names
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_limit": "mamba_dt_limit",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}


def _get(raw: dict[str, Any], key: str, default: Any) -> Any:
    if key in raw:
        return raw[key]
    if key in LEGACY and LEGACY[key] in raw:
        return raw[LEGACY[key]]
    return default


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a NemotronH config.json dict."""
    if raw.get("layers_block_type") is not None:
        kinds = [HF_KIND.get(t, t) for t in raw["layers_block_type"]]
    elif raw.get("hybrid_override_pattern") is not None:
        kinds = [PATTERN.get(c, c) for c in raw["hybrid_override_pattern"]]
    else:
        raise CheckpointError(f"{where} has neither layers_block_type nor hybrid_override_pattern")
    for k in kinds:
        if k not in ("mamba", "attention", "mlp", "moe"):
            raise CheckpointError(
                f"{where}: layer type {k!r} is not supported (nestlm handles Mamba2, attention, MLP and MoE layers)"
            )
    if "moe" in kinds:
        _check_moe(raw, where)
    if raw.get("mlp_hidden_act", "relu2") != "relu2":
        raise CheckpointError(f"{where}: mlp_hidden_act {raw['mlp_hidden_act']!r} is not supported (only relu2)")
    if raw.get("mamba_hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: mamba_hidden_act {raw['mamba_hidden_act']!r} is not supported (only silu)")
    try:
        hidden = raw["hidden_size"]
        n_heads = raw["num_attention_heads"] if "attention" in kinds else raw.get("num_attention_heads", 1)
        head_dim = raw.get("head_dim") or hidden // n_heads
        layers = []
        for k in kinds:
            if k == "mamba":
                layers.append(
                    LayerSpec(
                        "mamba",
                        heads=raw["mamba_num_heads"],
                        head_dim=raw["mamba_head_dim"],
                        groups=_get(raw, "n_groups", 8),
                        d_state=raw.get("ssm_state_size", 128),
                    )
                )
            elif k == "attention":
                layers.append(
                    LayerSpec(
                        "attention",
                        heads=n_heads,
                        kv_heads=raw.get("num_key_value_heads") or n_heads,
                        head_dim=head_dim,
                    )
                )
            elif k == "moe":
                layers.append(
                    LayerSpec(
                        "moe",
                        experts=raw["n_routed_experts"],
                        ffn=raw["moe_intermediate_size"],
                        shared_ffn=raw["moe_shared_expert_intermediate_size"],
                    )
                )
            else:
                layers.append(LayerSpec("mlp", ffn=raw["intermediate_size"]))
        moe = {}
        if "moe" in kinds:
            moe = dict(
                moe_top_k=raw["num_experts_per_tok"],
                moe_n_group=raw.get("n_group", 1),
                moe_topk_group=raw.get("topk_group", 1),
                moe_norm_topk_prob=raw.get("norm_topk_prob", True),
                moe_routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
            )
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            layers=layers,
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=False,  # decided from the weights in load_hf
            mlp_act="relu2",
            mlp_bias=raw.get("mlp_bias", False),
            attention_bias=False,  # NemotronH attention has no bias whatever the flag says
            rope_theta=None,
            mamba_conv_kernel=_get(raw, "conv_kernel", 4),
            mamba_chunk_size=_get(raw, "chunk_size", 128),
            mamba_conv_bias=_get(raw, "use_conv_bias", True),
            mamba_proj_bias=raw.get("use_bias", False),
            mamba_dt_min=_get(raw, "time_step_min", 1e-3),
            mamba_dt_init_max=_get(raw, "time_step_max", 0.1),
            mamba_dt_limit=_dt_limit(_get(raw, "time_step_limit", None), where),
            residual_in_fp32=raw.get("residual_in_fp32", False),
            init_std=raw.get("initializer_range", 0.02),
            pad_token_id=raw.get("pad_token_id"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            hf_config=copy.deepcopy(raw),
            **moe,
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]!r}, which a NemotronH config needs") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _dt_limit(value: Any, where: str) -> list[float]:
    """time_step_limit as the reference Mamba2 and transformers (>= 5.25) apply it: dt clamped to it, (0, inf)
    when absent. (Releases before 5.25 clamped at time_step_min in their chunked scan only: not the model's
    semantics, and not what mamba_ssm, vLLM or newer transformers compute.)"""
    if value is None:
        return [0.0, math.inf]
    value = [decode_float(v) for v in value] if isinstance(value, (list, tuple)) else value
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise CheckpointError(f"{where}: time_step_limit must be a pair [lo, hi], got {value!r}")
    return [float(v) for v in value]


def _check_moe(raw: dict[str, Any], where: str) -> None:
    """Refuse, in one line, the MoE features nestlm does not compute; say so when MTP layers are dropped."""
    if raw.get("moe_latent_size") is not None:
        raise CheckpointError(
            f"{where}: moe_latent_size {raw['moe_latent_size']} (latent expert projections, Nemotron 3 Super) "
            "is not supported; nestlm runs experts on the hidden size (moe_latent_size null)"
        )
    if raw.get("n_shared_experts", 1) != 1:
        raise CheckpointError(
            f"{where}: n_shared_experts {raw['n_shared_experts']} is not supported (NemotronH MoE has one)"
        )
    if raw.get("num_nextn_predict_layers", 0):
        print(
            f"nestlm: note: {where}: the {raw['num_nextn_predict_layers']} multi-token-prediction layer(s) (mtp.*) "
            "are dropped; the causal LM does not use them",
            file=sys.stderr,
        )


def group_to_rank_major(n_heads: int, n_groups: int) -> torch.Tensor:
    """Index p with new[j] = old[p[j]]: from group-major (h = g*R + r) to rank-major (j = r*G + g)."""
    return torch.arange(n_heads).view(n_groups, n_heads // n_groups).t().reshape(-1)


def _expand(perm: torch.Tensor, width: int) -> torch.Tensor:
    """Head permutation -> channel permutation for heads of ``width`` channels."""
    return (perm[:, None] * width + torch.arange(width)[None]).reshape(-1)


def permute_heads(cfg: ModelConfig, sd: dict[str, torch.Tensor], to_nestlm: bool) -> dict[str, torch.Tensor]:
    """Reorder Mamba and query heads between HF (group-major) and nestlm (rank-major) order."""
    sd = dict(sd)
    for i, spec in enumerate(cfg.layers):
        pre = f"layers.{i}.mixer."
        if spec.kind == "mamba":
            perm = group_to_rank_major(spec.heads, spec.groups)
            if not to_nestlm:
                perm = torch.argsort(perm)
            H, P = spec.heads, spec.head_dim
            ch = _expand(perm, P)
            rows = torch.arange(sd[pre + "in_proj.weight"].shape[0])
            rows[: H * P] = ch  # z
            rows[H * P : 2 * H * P] = H * P + ch  # x
            rows[-H:] = rows[-H:][perm]  # dt
            sd[pre + "in_proj.weight"] = sd[pre + "in_proj.weight"][rows]
            if pre + "in_proj.bias" in sd:
                sd[pre + "in_proj.bias"] = sd[pre + "in_proj.bias"][rows]
            conv_rows = torch.arange(sd[pre + "conv1d.weight"].shape[0])
            conv_rows[: H * P] = ch
            sd[pre + "conv1d.weight"] = sd[pre + "conv1d.weight"][conv_rows]
            if pre + "conv1d.bias" in sd:
                sd[pre + "conv1d.bias"] = sd[pre + "conv1d.bias"][conv_rows]
            for name in ("dt_bias", "A_log", "D"):
                sd[pre + name] = sd[pre + name][perm]
            sd[pre + "norm.weight"] = sd[pre + "norm.weight"][ch]
            sd[pre + "out_proj.weight"] = sd[pre + "out_proj.weight"][:, ch]
        elif spec.kind == "attention" and spec.heads != spec.kv_heads:
            perm = group_to_rank_major(spec.heads, spec.kv_heads)
            if not to_nestlm:
                perm = torch.argsort(perm)
            ch = _expand(perm, spec.head_dim)
            sd[pre + "q_proj.weight"] = sd[pre + "q_proj.weight"][ch]
            sd[pre + "o_proj.weight"] = sd[pre + "o_proj.weight"][:, ch]
    return {k: v.contiguous() for k, v in sd.items()}


_EXPERT = re.compile(r"^(layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def stack_experts(sd: dict[str, torch.Tensor], origin: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per-expert 2D weights as published (``experts.{j}.up_proj.weight``) -> nestlm's 3D ``experts.up_proj``."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, t in sd.items():
        m = _EXPERT.match(key)
        if m is None:
            out[key] = t
        else:
            found.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
    for key, parts in found.items():
        if sorted(parts) != list(range(len(parts))) or len({p.shape for p in parts.values()}) > 1:
            raise CheckpointError(f"the experts of {key!r} are not numbered 0..n-1 with one shape")
        out[key] = torch.stack([parts[j] for j in range(len(parts))])
        origin[key] = origin[f"{key.rsplit('.', 1)[0]}.0.{key.rsplit('.', 1)[1]}.weight"]
    for key in out:  # the router is fp32 in every checkpoint dtype (transformers keeps it so too)
        if key.endswith((".mixer.gate.weight", ".mixer.gate.e_score_correction_bias")):
            out[key] = out[key].float()
    return out


def unstack_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nestlm's 3D expert weights -> the per-expert 2D layout transformers saves and loads."""
    out = {}
    for key, t in sd.items():
        if key.endswith((".mixer.experts.up_proj", ".mixer.experts.down_proj")):
            base, name = key.rsplit(".", 1)
            out |= {f"{base}.{j}.{name}.weight": t[j] for j in range(t.shape[0])}
        else:
            out[key] = t
    return out


def load_hf(path: Path, raw: dict[str, Any] | None = None) -> HybridLM:
    """Load a Hugging Face NemotronH directory (config.json + single or sharded safetensors)."""
    path = Path(path)
    if raw is None:
        raw = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(raw, str(path / "config.json"))
    tensors, where = read_safetensors(path)
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, t in tensors.items():
        if key.startswith("mtp."):  # multi-token-prediction heads are not part of the LM
            continue
        new = key
        for prefix in ("backbone.", "model."):
            if key.startswith(prefix):
                new = key[len(prefix) :]
                break
        sd[new] = t
        origin[new] = f"{where[key]} (as {key!r})"
    sd = stack_experts(sd, origin)
    emb = sd.get("embeddings.weight")
    head = sd.get("lm_head.weight")
    cfg.tie_embeddings = head is None or (emb is not None and head.shape == emb.shape and torch.equal(head, emb))
    if cfg.tie_embeddings and head is not None:
        del sd["lm_head.weight"]
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, sd, lambda k: origin[k])
    sd = permute_heads(cfg, sd, to_nestlm=True)
    model.load_state_dict(sd, assign=True)
    return model


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """NemotronH config.json values for ``cfg``; values it does not own come from cfg.hf_config."""
    kinds = {k: [ls for ls in cfg.layers if ls.kind == k] for k in ("mamba", "attention", "mlp", "moe")}
    for kind, specs in kinds.items():
        if len({tuple(ls.to_dict().items()) for ls in specs}) > 1:
            raise CheckpointError(
                f"the Hugging Face NemotronH format needs the same widths in every {kind} layer, and this model's "
                f"differ (a heterogeneous slice); save it in nestlm format instead (--format nestlm / save_pretrained)"
            )
    if cfg.mlp_act != "relu2":
        raise CheckpointError("NemotronH MLPs use relu2; a SwiGLU model can only be saved in nestlm format")
    if cfg.rope_theta is not None:
        raise CheckpointError("NemotronH has no positional embedding; a RoPE model can only be saved in nestlm format")
    if cfg.attention_bias:
        raise CheckpointError("NemotronH attention has no bias; this model can only be saved in nestlm format")
    out: dict[str, Any] = (
        copy.deepcopy(cfg.hf_config)
        if cfg.hf_config
        else {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "expand": 2,
        }
    )
    out["model_type"] = "nemotron_h"
    out["vocab_size"] = cfg.vocab_size
    out["hidden_size"] = cfg.hidden_size
    types = [NESTLM_TO_HF_KIND[ls.kind] for ls in cfg.layers]
    if "hybrid_override_pattern" in out and "layers_block_type" not in out:
        out["hybrid_override_pattern"] = cfg.pattern
    else:
        out["layers_block_type"] = types
    if "num_hidden_layers" in out:
        out["num_hidden_layers"] = len(types)
    if kinds["mamba"]:
        m = kinds["mamba"][0]
        out["mamba_num_heads"], out["mamba_head_dim"], out["ssm_state_size"] = m.heads, m.head_dim, m.d_state
        out[LEGACY["n_groups"] if LEGACY["n_groups"] in out and "n_groups" not in out else "n_groups"] = m.groups
    if kinds["attention"]:
        a = kinds["attention"][0]
        out["num_attention_heads"], out["num_key_value_heads"], out["head_dim"] = a.heads, a.kv_heads, a.head_dim
    if kinds["mlp"]:
        out["intermediate_size"] = kinds["mlp"][0].ffn
    if kinds["moe"]:
        e = kinds["moe"][0]
        out["n_routed_experts"], out["moe_intermediate_size"] = e.experts, e.ffn
        out["moe_shared_expert_intermediate_size"] = e.shared_ffn
        out["num_experts_per_tok"] = cfg.moe_top_k
        out["n_group"], out["topk_group"] = cfg.moe_n_group, cfg.moe_topk_group
        out["norm_topk_prob"], out["routed_scaling_factor"] = cfg.moe_norm_topk_prob, cfg.moe_routed_scaling_factor
        out["n_shared_experts"], out["moe_latent_size"] = 1, None
    if out.get("num_nextn_predict_layers"):  # the mtp.* weights were dropped on load
        out["num_nextn_predict_layers"] = 0
    simple = {
        "layer_norm_epsilon": cfg.norm_eps,
        "mlp_bias": cfg.mlp_bias,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "use_conv_bias": cfg.mamba_conv_bias,
        "use_bias": cfg.mamba_proj_bias,
        "time_step_min": cfg.mamba_dt_min,
        "time_step_max": cfg.mamba_dt_init_max,
        "time_step_limit": [encode_float(v) for v in cfg.mamba_dt_limit],  # inf as transformers writes it
        "residual_in_fp32": cfg.residual_in_fp32,
        "initializer_range": cfg.init_std,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    for key, value in simple.items():
        name = LEGACY[key] if key in LEGACY and LEGACY[key] in out and key not in out else key
        out[name] = value
    if not cfg.hf_config:
        out["tie_word_embeddings"] = cfg.tie_embeddings
    # else: keep the source's flag. The file always holds lm_head.weight (an equal copy when
    # tied) and transformers' NemotronH never ties it, so the flag changes nothing on load,
    # and rewriting it would break the round trip of a checkpoint whose head merely equals
    # its embeddings.
    return out


def hf_files(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], str | None]:
    """config.json, the tensors (as the file names them) of ``model`` in NemotronH format, and why the installed
    transformers cannot use its cache on it (None when it can; config.json then says use_cache: false)."""
    cfg = model.config
    raw = hf_config_dict(cfg)
    first = cfg.layers[0].kind
    # transformers 5.23-5.25 fail on an MLP- or MoE-first NemotronH whenever its cache is used (a budget that
    # drops the first Mamba layer gives such a model); without the cache they compute it right
    without_cache = transformers_fails_first_layer(first) if first in ("mlp", "moe") else None
    if without_cache:
        raw["use_cache"] = False
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:  # transformers' NemotronH keeps an lm_head of its own
        sd["lm_head.weight"] = sd["embeddings.weight"]
    sd = unstack_experts(permute_heads(cfg, sd, to_nestlm=False))
    files = {
        ("lm_head.weight" if k == "lm_head.weight" else "backbone." + k): v.clone().contiguous() for k, v in sd.items()
    }
    return raw, files, without_cache


def export_hf(model: Any, path: str | Path, overwrite: bool = False) -> None:
    """Write ``model`` in Hugging Face NemotronH format (loads with plain transformers, tokenizer included)."""
    raw, files, without_cache = hf_files(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(files, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", raw)
        copy_tokenizer(model.source_dir, tmp)  # generation_config.json and the source's HF tokenizer files
        write_hf_tokenizer(model.source_dir, tmp)  # a byte-level source: tokenizer.json + tokenizer_config.json
        if without_cache:
            gen = tmp / "generation_config.json"
            write_json(gen, (json.loads(gen.read_text()) if gen.is_file() else {}) | {"use_cache": False})
    if without_cache:
        note_without_cache(model.config.layers[0].kind, without_cache)


def note_without_cache(first: str, why: str) -> None:
    print(
        f"nestlm: note: the first layer is a{'n MLP' if first == 'mlp' else ' MoE'} block, which the installed "
        f"transformers {transformers_version()} runs only without its cache ({why}): config.json and "
        "generation_config.json say use_cache: false (vLLM and nestlm ignore it)",
        file=sys.stderr,
    )
