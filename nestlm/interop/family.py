"""An elastic model as ONE Hugging Face directory holding every budget (``nestlm export-hf``).

The directory is the parent's own family directory (NemotronH for hybrids, dense or MoE; the source's type for
Llama, Mistral, Qwen2 and Qwen3 parents), so tools that ignore custom code load the full model, plus:

* config.json: ``auto_map`` to the custom code written beside the weights, ``nestlm_budgets`` (every frozen
  budget: its architecture, exact total and active parameter counts, deployment memory) and ``nestlm_parent``;
* the custom code (``nestlm/interop/hf_family``): transformers' family class with ``budget=`` in forward,
  generate and save_pretrained; it imports only torch and transformers;
* one copy of the weights in importance order (sharded with an index above ``max_shard_bytes``), the tokenizer
  files, generation_config.json and a model card (README.md) with the budget table.

``nestlm.load`` reads the directory back with its budgets (``budgets_from_config``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Budget, atomic_dir, copy_tokenizer, save_tensors, write_json
from ..config import ModelConfig
from ..elastic.arch import count_parameters
from ..elastic.counts import active_parameters
from ..errors import CheckpointError
from ..tokenizer import write_hf_tokenizer
from . import llama, nemotron_h

BUDGETS_KEY = "nestlm_budgets"  # config.json: name -> Budget record (the custom code reads the same key)
PARENT_KEY = "nestlm_parent"
OWN_KEYS = (BUDGETS_KEY, PARENT_KEY, "auto_map")  # config.json keys of the family directory, not of the parent
CODE_DIR = Path(__file__).parent / "hf_family"
PREFIX = {"nemotron_h": "NemotronH", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SHARD_BYTES = 5 * 2**30  # one file up to 5 GiB; above it, numbered shards and model.safetensors.index.json
MEMORY_DTYPE, MEMORY_CONTEXT = torch.bfloat16, 4096  # the model card's deployment memory: weights + caches
KEEP_FP32 = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")  # MoE routers stay fp32 in every dtype


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of "5GB", "500MB", "100KB" (powers of 1024) or a plain number; a one-line error otherwise."""
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    t = str(text).strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    try:
        n = float(t[: len(t) - len(unit)] if t.endswith(unit) else t) * units[unit]
    except ValueError:
        n = -1.0
    if not n > 0:
        raise CheckpointError(f"{what} {text!r} is not a size; give bytes or a number with KB, MB, GB or TB")
    return int(n)


def model_type_of(config: ModelConfig) -> str:
    """The family a model is exported as: its Transformer source's type, else NemotronH."""
    src = (config.hf_config or {}).get("model_type")
    return src if src in llama.MODEL_TYPES else "nemotron_h"


def check_exportable(model: Any) -> str:
    """The model type of the family directory ``model`` makes; a one-line CheckpointError when it makes none."""
    if not getattr(model, "elastic", None):
        raise CheckpointError(
            "export-hf writes an elastic family (every frozen budget in one directory), and this is a plain model "
            "without budgets; train one with nestlm train, or write this model alone with nestlm slice --format hf"
        )
    model_type = model_type_of(model.config)
    family = llama if model_type in llama.MODEL_TYPES else nemotron_h
    try:
        family.hf_config_dict(model.config)
    except CheckpointError as e:
        raise CheckpointError(f"export-hf: the parent has no Hugging Face family format: {e}") from None
    return model_type


def budget_records(model: Any) -> dict[str, dict[str, Any]]:
    """config.json's ``nestlm_budgets``: each Budget's record plus its deployment memory (bf16, 4096 tokens)."""
    cfg, out = model.config, {}
    for name, b in model.elastic.items():
        rec = b.to_dict()
        rec["active_params"] = b.active_params if b.active_params is not None else b.arch.active_parameters(cfg)
        rec["deployment_memory"] = {
            "bytes": b.arch.memory_bytes(cfg, MEMORY_DTYPE, batch=1, context=MEMORY_CONTEXT),
            "dtype": str(MEMORY_DTYPE).removeprefix("torch."),
            "context": MEMORY_CONTEXT,
            "batch": 1,
        }
        out[name] = rec
    return out


def budgets_from_config(raw: dict[str, Any], config: ModelConfig, where: str) -> dict[str, Budget]:
    """The budgets an exported family directory's config.json lists ({} for a plain directory)."""
    table = raw.get(BUDGETS_KEY)
    if not table:
        return {}
    try:
        return {name: Budget.from_dict(name, rec, config) for name, rec in table.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: {BUDGETS_KEY} is not valid: {e}") from None


def write_weights(tensors: dict[str, torch.Tensor], d: Path, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or (over ``max_shard_bytes``) model-0000i-of-0000n.safetensors + the index; the files."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_tensors(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():  # in the model's order: a shard holds whole layers where it can
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_tensors(shard, d / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _eval_results(source_dir: str | None) -> dict[str, dict[str, float]]:
    """The run's results per budget: an eval.json of ``nestlm eval`` in the model directory, else the last
    validation of training (metrics.jsonl, KD loss to the parent); {} when it has neither."""
    if not source_dir:
        return {}
    d = Path(source_dir)
    try:
        if (d / "eval.json").is_file():
            rows = json.loads((d / "eval.json").read_text())["rows"]
            keys = ("loss", "ppl", "accuracy")
            return {str(r["name"]): {k: float(r[k]) for k in keys if r.get(k) is not None} for r in rows}
        if (d / "metrics.jsonl").is_file():
            vals = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
            if vals and isinstance(vals[-1].get("val"), dict):
                return {name: {"val_loss": float(v)} for name, v in vals[-1]["val"].items()}
    except (ValueError, KeyError, TypeError, OSError):
        return {}
    return {}


def _size(n: int) -> str:
    unit = next((u for u, k in (("GiB", 30), ("MiB", 20)) if n >= 2**k), "KiB")
    return f"{n / 2 ** {'GiB': 30, 'MiB': 20, 'KiB': 10}[unit]:.3g} {unit}"


def model_card(name: str, model_type: str, records: dict[str, dict[str, Any]], parent: dict[str, int], evals) -> str:
    """README.md: what the directory is, the budget table, and how to use it."""
    metrics = sorted({k for v in evals.values() for k in v})
    head = ["budget", "parameters", "active parameters", "of the full model", "memory (bf16, 4096 tokens)"]
    lines = ["| " + " | ".join(head + metrics) + " |", "|" + "---|" * (len(head) + len(metrics))]
    for b, r in records.items():
        mem = _size(r["deployment_memory"]["bytes"])
        cells = [f"`{b}`", f"{r['params']:,}", f"{r['active_params']:,}", f"{r['fraction']:.1%}", mem]
        cells += [f"{evals.get(b, {}).get(m, math.nan):.4g}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    biggest = next(iter(records))
    evals_note = (
        "Evaluation: " + ", ".join(metrics) + " as the run recorded them (val_loss: KD loss to the parent)."
        if metrics
        else "No evaluation results were recorded with this run."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [nestlm, elastic, nested, {model_type}]
---

# {name}: {len(records)} nested budgets in one checkpoint

An elastic {PREFIX[model_type]} family trained with nestlm (the method of Nemotron Elastic, arXiv 2511.16664):
every budget below is a sub-network of the full model, kept as a prefix of its weights in importance order, so
the directory holds **one copy** of the weights ({parent["params"]:,} parameters) and serves every budget from it.
Counts are exact; memory is the weights plus the KV and Mamba caches of one sequence at bf16.

{chr(10).join(lines)}

{evals_note}

## Use

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{name}"
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=True)
inputs = tok("2 + 3 * 4 =", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, budget="{list(records)[-1]}", do_sample=True, temperature=0.7)
print(tok.decode(out[0], skip_special_tokens=True))
```

`budget=None` (the default) is the full model; `model.budgets` lists the names; an unknown name is an error that
lists them. `model(input_ids, budget=...)` gives a budget's logits; a budget runs on views of the full weights.

One budget as a plain standalone {PREFIX[model_type]} directory (no custom code needed to load it):

```python
model.save_pretrained("{name}-{biggest}", budget="{biggest}")
```

Without `trust_remote_code`, this directory loads as the plain {PREFIX[model_type]} parent (the full model), so
tools that ignore custom code (vLLM, TGI, lm-evaluation-harness's hf backend) see a valid model.
"""


def export_family(
    model: Any,
    path: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> None:
    """Write elastic ``model`` (every frozen budget) as one Hugging Face directory at ``path`` (atomically)."""
    model_type = check_exportable(model)
    family = llama if model_type in llama.MODEL_TYPES else nemotron_h
    raw, files, without_cache = family.hf_files(model)
    if dtype is not None:
        files = {k: v if k.endswith(KEEP_FP32) or not v.is_floating_point() else v.to(dtype) for k, v in files.items()}
    main = next(k for k in files if k.endswith(("embeddings.weight", "embed_tokens.weight")))
    raw.pop("torch_dtype", None)
    raw["dtype"] = str(files[main].dtype).removeprefix("torch.")
    prefix = PREFIX[model_type]
    raw["architectures"] = [f"{prefix}ForCausalLM"]
    raw["auto_map"] = {
        "AutoConfig": f"configuration_nestlm.Nested{prefix}Config",
        "AutoModelForCausalLM": f"modeling_nestlm.Nested{prefix}ForCausalLM",
    }
    cfg = model.config
    records = budget_records(model)
    parent = {"params": count_parameters(cfg), "active_params": active_parameters(cfg)}
    raw[BUDGETS_KEY] = records
    raw[PARENT_KEY] = parent | {"format": "nestlm elastic family, export-hf"}
    code = "modeling_nemotron_h.py" if model_type == "nemotron_h" else "modeling_transformer.py"
    name = Path(path).name
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_weights(files, tmp, max_shard_bytes)
        for src, dst in (("configuration_nestlm.py",) * 2, ("nested.py",) * 2, (code, "modeling_nestlm.py")):
            shutil.copyfile(CODE_DIR / src, tmp / dst)
        copy_tokenizer(model.source_dir, tmp)  # the source's tokenizer files and generation_config.json
        write_hf_tokenizer(model.source_dir, tmp)  # a byte-level source: tokenizer.json + tokenizer_config.json
        gen_file = tmp / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key not in gen and raw.get(key) is not None:
                gen[key] = raw[key]
        if without_cache:
            gen["use_cache"] = False
        write_json(gen_file, gen)
        (tmp / "README.md").write_text(model_card(name, model_type, records, parent, _eval_results(model.source_dir)))
        write_json(tmp / "config.json", raw)
    if without_cache:
        nemotron_h.note_without_cache(cfg.layers[0].kind, without_cache)
