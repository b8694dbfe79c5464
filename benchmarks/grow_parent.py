"""A larger parent made from a trained one, its function kept: attention layers inserted.

    python benchmarks/grow_parent.py --model nestlm/assets/parent --after 1,6 --out runs/parent-4attn
    nestlm train parent-long --out runs/parent-long-4attn model.path=runs/parent-4attn

Why: the long-problem parent's wrong solutions read a variable's value by recency instead of by its
name (benchmarks/long_errors.py; docs/study.md), a lookup that attention does and a Mamba state does
badly; the shipped parent has two attention layers of ten. Each inserted layer is a pre-norm
attention block like the parent's own (same heads, key/value heads, head width), initialised as a
fresh model would be except its output projection, which is zero: the block adds nothing to the
residual stream at first, so the grown model's logits equal the parent's exactly, and the second
stage (recipes/parent-long.yaml) starts from the stage-1 parent's skills with more attention to learn
with. The check: ``--check`` compares logits with the parent's on a batch of problems.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import nestlm
from nestlm.config import LayerSpec
from nestlm.model import HybridLM


def grow(parent: HybridLM, after: list[int], seed: int = 0) -> HybridLM:
    """``parent`` with one attention layer inserted after each index in ``after`` (indices of the parent's
    layers; the parent's first attention layer's shape), output projections zero: the same function."""
    layers = list(parent.config.layers)
    attn = next((s for s in layers if s.kind == "attention"), None)
    if attn is None:
        raise SystemExit("grow_parent: the parent has no attention layer to copy the shape of")
    bad = [i for i in after if not 0 <= i < len(layers)]
    if bad or len(set(after)) != len(after):
        raise SystemExit(f"grow_parent: --after {after} must be distinct layer indices within 0..{len(layers) - 1}")
    new_layers: list[LayerSpec] = []
    source: list[int | None] = []  # the parent layer each new layer copies (None: inserted)
    for i, spec in enumerate(layers):
        new_layers.append(spec)
        source.append(i)
        if i in after:
            new_layers.append(dataclasses.replace(attn))
            source.append(None)
    cfg = dataclasses.replace(parent.config, layers=new_layers)
    torch.manual_seed(seed)
    grown = HybridLM(cfg)
    sd = parent.state_dict()
    new_sd = grown.state_dict()
    for k, v in sd.items():
        if not k.startswith("layers."):
            new_sd[k] = v.clone()
    for j, i in enumerate(source):
        if i is None:
            new_sd[f"layers.{j}.mixer.o_proj.weight"].zero_()  # adds nothing to the residual stream at first
            continue
        for k, v in sd.items():
            if k.startswith(f"layers.{i}."):
                new_sd[f"layers.{j}." + k[len(f"layers.{i}.") :]] = v.clone()
    grown.load_state_dict(new_sd)
    grown.source_dir = parent.source_dir  # its tokenizer, chat template and generation config go with it
    return grown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the trained parent (a nestlm directory)")
    ap.add_argument("--after", required=True, help="comma-separated parent layer indices to insert attention after")
    ap.add_argument("--out", required=True, help="a new directory for the grown model")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed of the inserted layers")
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        raise SystemExit(f"grow_parent: --out {args.out} exists; give a new directory")
    parent = nestlm.load(args.model).eval()
    grown = grow(parent, [int(x) for x in args.after.split(",")], args.seed).eval()
    ids = torch.randint(1, parent.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (grown(ids).logits - parent(ids).logits).abs().max().item()
    grown.save_pretrained(args.out)
    n0, n1 = parent.num_parameters(), grown.num_parameters()
    print(f"grew {args.model} ({n0:,} parameters, {parent.config.pattern}) into {args.out}")
    print(f"  {n1:,} parameters ({grown.config.pattern}); logits differ from the parent's by {diff:.1e} at most")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
