"""Hugging Face Transformer families (llama, mistral, qwen2, qwen3) <-> nestlm.

A Transformer layer is two nestlm blocks, each with its own pre-norm:
  model.layers.i.input_layernorm + self_attn         -> layers.{2i}   (attention)
  model.layers.i.post_attention_layernorm + mlp      -> layers.{2i+1} (SwiGLU MLP)
Family differences are config flags of the one HybridLM: Qwen2 has biases on q, k and v
but not o; Qwen3 normalises q and k per head (q_norm, k_norm) before RoPE; Llama 3.x
scales the RoPE frequencies (rope_type llama3, read from ``rope_scaling`` as published
checkpoints write it and from ``rope_parameters`` as transformers 5 does). Query heads are
KV-group-major in Hugging Face files and rank-major in nestlm (see nemotron_h.py): load
permutes, export permutes back. Export writes the source's own model type and keeps
every config value it does not own, with ``head_dim`` always explicit.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import atomic_dir, check_state_dict, copy_tokenizer, read_safetensors, write_json
from ..config import ConfigError, LayerSpec, ModelConfig
from ..errors import CheckpointError
from .nemotron_h import _expand, group_to_rank_major

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(raw: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling or None) from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: rope_parameters / rope_scaling must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{where}: per-layer-type RoPE parameters are not supported (one RoPE for all layers)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{where}: RoPE type {rope_type!r} is not supported (nestlm implements {', '.join(ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} is not supported (only full-width RoPE)")
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": "llama3"}
    for k in LLAMA3_KEYS:
        v = params.get(k, raw.get("max_position_embeddings") if k == "original_max_position_embeddings" else None)
        if v is None:
            raise CheckpointError(f"{where}: llama3 RoPE scaling lacks {k!r}")
        scaling[k] = v
    return float(theta), scaling


def _sliding_window_applies(raw: dict[str, Any], n_layers: int) -> bool:
    """Whether some layer attends through a window shorter than the context.

    Qwen2/Qwen3 carry ``sliding_window`` but use it only when ``use_sliding_window`` is true (and
    then in the layers ``layer_types`` marks, or from ``max_window_layers`` on); Mistral applies its
    window everywhere, which changes nothing when it is at least the context length.
    """
    window = raw.get("sliding_window")
    if window is None or window >= raw.get("max_position_embeddings", math.inf):
        return False
    if raw.get("model_type") in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            return False
        types = raw.get("layer_types")
        if types is not None:
            return "sliding_attention" in types
        return raw.get("max_window_layers", n_layers) < n_layers
    return True


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a llama / mistral / qwen2 / qwen3 config.json dict."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only silu, the SwiGLU MLP)")
    if raw.get("pretraining_tp", 1) != 1:
        raise CheckpointError(f"{where}: pretraining_tp {raw['pretraining_tp']} is not supported (only 1)")
    theta, scaling = _rope(raw, where)
    try:
        n_layers = raw["num_hidden_layers"]
        if _sliding_window_applies(raw, n_layers):
            raise CheckpointError(
                f"{where}: sliding-window attention (window {raw['sliding_window']} < context "
                f"{raw.get('max_position_embeddings')}) is not supported; nestlm runs full attention only"
            )
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or hidden // heads
        attn = LayerSpec("attention", heads=heads, kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim)
        mlp = LayerSpec("mlp", ffn=raw["intermediate_size"])
        if model_type == "qwen2":  # biases on q, k, v; none on o (hard-wired in transformers)
            bias, out_bias = True, False
        elif model_type == "mistral":
            bias, out_bias = False, None
        else:
            bias, out_bias = bool(raw.get("attention_bias", False)), None
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            layers=[LayerSpec(**ls.to_dict()) for _ in range(n_layers) for ls in (attn, mlp)],
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            mlp_act="swiglu",
            mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
            attention_bias=bias,
            attention_out_bias=out_bias,
            attention_qk_norm=model_type == "qwen3",
            rope_theta=theta,
            rope_scaling=scaling,
            init_std=raw.get("initializer_range", 0.02),
            pad_token_id=raw.get("pad_token_id"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            hf_config=copy.deepcopy(raw),
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]!r}, which a {model_type} config needs") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


# HF name inside model.layers.i -> (block offset, nestlm name inside the block)
_LAYER_NAMES = {
    "input_layernorm.weight": (0, "norm.weight"),
    "post_attention_layernorm.weight": (1, "norm.weight"),
    **{
        f"self_attn.{p}.{t}": (0, f"mixer.{p}.{t}")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for t in ("weight", "bias")
    },
    "self_attn.q_norm.weight": (0, "mixer.q_norm.weight"),
    "self_attn.k_norm.weight": (0, "mixer.k_norm.weight"),
    **{
        f"mlp.{p}.{t}": (1, f"mixer.{p}.{t}") for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")
    },
}
_NESTLM_NAMES = {v: k for k, v in _LAYER_NAMES.items()}


def _to_nestlm_name(key: str) -> str | None:
    """nestlm name of a Hugging Face tensor name (None: not a weight we know)."""
    if key == "model.embed_tokens.weight":
        return "embeddings.weight"
    if key == "model.norm.weight":
        return "norm_f.weight"
    if key == "lm_head.weight":
        return key
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_NAMES:
        off, name = _LAYER_NAMES[parts[3]]
        return f"layers.{2 * int(parts[2]) + off}.{name}"
    return None


def _to_hf_name(key: str) -> str:
    if key == "embeddings.weight":
        return "model.embed_tokens.weight"
    if key == "norm_f.weight":
        return "model.norm.weight"
    if key == "lm_head.weight":
        return key
    _, i, name = key.split(".", 2)
    return f"model.layers.{int(i) // 2}.{_NESTLM_NAMES[(int(i) % 2, name)]}"


def permute_query_heads(cfg: ModelConfig, sd: dict[str, torch.Tensor], to_nestlm: bool) -> dict[str, torch.Tensor]:
    """Query heads (q_proj rows and bias, o_proj columns) between KV-group-major (HF) and rank-major order."""
    sd = dict(sd)
    for i, spec in enumerate(cfg.layers):
        if spec.kind != "attention" or spec.heads == spec.kv_heads:
            continue
        perm = group_to_rank_major(spec.heads, spec.kv_heads)
        ch = _expand(perm if to_nestlm else torch.argsort(perm), spec.head_dim)
        pre = f"layers.{i}.mixer."
        sd[pre + "q_proj.weight"] = sd[pre + "q_proj.weight"][ch]
        if pre + "q_proj.bias" in sd:
            sd[pre + "q_proj.bias"] = sd[pre + "q_proj.bias"][ch]
        sd[pre + "o_proj.weight"] = sd[pre + "o_proj.weight"][:, ch]
    return {k: v.contiguous() for k, v in sd.items()}


def load_hf(path: Path, raw: dict[str, Any] | None = None) -> Any:
    """Load a Hugging Face llama / mistral / qwen2 / qwen3 directory (single or sharded safetensors)."""
    from ..model import HybridLM

    path = Path(path)
    if raw is None:
        raw = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(raw, str(path / "config.json"))
    tensors, where = read_safetensors(path)
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, t in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed from the config
            continue
        new = _to_nestlm_name(key)
        if new is None:
            raise CheckpointError(f"unexpected tensor {key!r} in {where[key]} (a {raw['model_type']} model has none)")
        sd[new] = t
        origin[new] = f"{where[key]} (as {key!r})"
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        if not torch.equal(sd["lm_head.weight"], sd.get("embeddings.weight", sd["lm_head.weight"])):
            raise CheckpointError(
                f"{path / 'config.json'} says tie_word_embeddings, but lm_head.weight differs from the embeddings"
            )
        del sd["lm_head.weight"]
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, sd, lambda k: origin[k])
    sd = permute_query_heads(cfg, sd, to_nestlm=True)
    model.load_state_dict(sd, assign=True)
    return model


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the source's family for ``cfg``; values it does not own come from cfg.hf_config."""
    src = cfg.hf_config or {}
    model_type = src.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not a Transformer family nestlm writes ({', '.join(MODEL_TYPES)})"
        )
    kinds = [ls.kind for ls in cfg.layers]
    if len(kinds) % 2 or kinds != ["attention", "mlp"] * (len(kinds) // 2):
        raise CheckpointError(
            f"the Hugging Face {model_type} format needs whole Transformer layers (an attention block followed by "
            "an MLP block), and this model keeps one without the other (a depth slice that dropped single blocks); "
            "save it in nestlm format instead (--format nestlm / save_pretrained)"
        )
    for kind in ("attention", "mlp"):
        if len({(ls.heads, ls.kv_heads, ls.head_dim, ls.ffn) for ls in cfg.layers if ls.kind == kind}) > 1:
            raise CheckpointError(
                f"the Hugging Face {model_type} format needs the same widths in every {kind} layer, and this model's "
                f"differ (a heterogeneous slice); save it in nestlm format instead (--format nestlm / save_pretrained)"
            )
    a, m = cfg.layers[0], cfg.layers[1]
    if model_type == "llama" and cfg.hidden_size % a.heads:
        raise CheckpointError(
            f"transformers' LlamaConfig needs hidden_size divisible by num_attention_heads, and this model has "
            f"{cfg.hidden_size} and {a.heads}; choose a hidden size that is a multiple of the heads, or save it in "
            "nestlm format instead (--format nestlm / save_pretrained)"
        )
    out = copy.deepcopy(src)
    n = len(kinds) // 2
    out.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=m.ffn,
        num_hidden_layers=n,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,  # explicit: hidden_size / heads no longer implies it once either is sliced
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if "layer_types" in out:  # only full attention is loaded, so every kept layer is one
        out["layer_types"] = ["full_attention"] * n
    if "architectures" not in out or not out["architectures"]:
        out["architectures"] = [ARCHITECTURES[model_type]]
    return out


def hf_files(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """config.json and the tensors (as the file names them) of ``model`` in its source's format (None: its
    cache always works in transformers, unlike some NemotronH shapes)."""
    cfg = model.config
    raw = hf_config_dict(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) == 1:  # transformers loads in the dtype config.json names
        raw["dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        raw.pop("torch_dtype", None)
    sd = permute_query_heads(cfg, sd, to_nestlm=False)
    return raw, {_to_hf_name(k): v.clone().contiguous() for k, v in sd.items()}, None


def export_hf(model: Any, path: str | Path, overwrite: bool = False) -> None:
    """Write ``model`` in its source's Hugging Face format (loads with plain transformers)."""
    raw, files, _ = hf_files(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(files, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", raw)
        copy_tokenizer(model.source_dir, tmp)
