"""How big a training checkpoint of the 12B recipe is, and how long a save may take (an ESTIMATE).

    python benchmarks/bench_checkpoint.py [--world-size 64] [--gbps 1 2 5 10]

The parent is Nemotron Nano 12B v2 (DESIGN.md section 1: 62 layers, 28 Mamba2, 28 MLP, 6
attention; hidden 5120, FFN 20480, Mamba 128 heads x 80 in 8 groups, d_state 128, 40 query /
8 KV heads of 128, vocab 131072, untied embeddings); its exact parameter count comes from
ModelConfig without allocating the model (the order of the layers does not change the count).
A checkpoint holds fp32 master weights plus AdamW's two fp32 moments: 12 bytes a parameter;
each rank writes 1/world of it (torch.distributed.checkpoint, sharded). The save time is
bytes / write bandwidth: the aggregate bandwidth of the filesystem the run writes to, which
this script cannot measure for your cluster; it prints the time at a few assumed values.
"""

from __future__ import annotations

import argparse

from nestlm.config import ModelConfig
from nestlm.elastic.arch import count_parameters


def nano_12b() -> ModelConfig:
    pattern = "M-" * 28 + "*" * 6  # 28 Mamba2, 28 MLP, 6 attention
    return ModelConfig.from_pattern(
        pattern,
        vocab_size=131072,
        hidden_size=5120,
        mamba_heads=128,
        mamba_head_dim=80,
        mamba_groups=8,
        d_state=128,
        attn_heads=40,
        kv_heads=8,
        attn_head_dim=128,
        ffn=20480,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=64)
    ap.add_argument("--gbps", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0, 20.0], help="GB/s aggregate")
    args = ap.parse_args()
    n = count_parameters(nano_12b())
    total = 12 * n  # fp32 weights + exp_avg + exp_avg_sq
    print(f"parameters: {n:,} ({n / 1e9:.2f}B)")
    print(f"checkpoint: {total / 1e9:.1f} GB (weights {4 * n / 1e9:.1f} GB + AdamW moments {8 * n / 1e9:.1f} GB)")
    print(f"per rank at world size {args.world_size}: {total / args.world_size / 1e9:.2f} GB")
    print("estimated save time (bytes / aggregate write bandwidth; an estimate, not a measurement):")
    for g in args.gbps:
        print(f"  {g:>5.1f} GB/s: {total / (g * 1e9):7.0f} s")


if __name__ == "__main__":
    main()
