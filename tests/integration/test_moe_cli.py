"""`nestlm importance` then `nestlm prune --format hf` on a NemotronH MoE directory: transformers loads the
result, with narrower experts than the parent and the parameter counts nestlm printed."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nestlm
from nestlm.cli import main
from tests.moe_models import SHAPES, load_hf, make_moe

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = "g1-k1-nonorm-bias"


def test_importance_then_prune_to_hf(tmp_path, capsys: pytest.CaptureFixture) -> None:
    hf_dir = make_moe(tmp_path / "hf", seed=5, **SHAPES[SHAPE])
    data = tmp_path / "calib.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text(
        "".join(json.dumps({"input_ids": torch.randint(0, 101, (200,), generator=g).tolist()}) + "\n" for _ in range(4))
    )
    ranked, out = tmp_path / "ranked", tmp_path / "pruned"
    argv = ["importance", "--model", str(hf_dir), "--data", str(data), "--out", str(ranked), "--seq-len", "64"]
    assert main(argv + ["--no-depth"]) == 0
    imp = json.loads((ranked / "importance.json").read_text())
    assert imp["reordered"] and len(imp["layers"][0]["expert"]) == 6
    capsys.readouterr()
    # experts of 16 and 12: at the default width multiple (8) 12 has no narrower choice near 0.6, at 4 it has
    argv = ["prune", "--model", str(ranked), "--budget", "0.6", "--out", str(out), "--format", "hf"]
    assert main(argv + ["--width-multiple", "4"]) == 0
    printed = capsys.readouterr().out
    total = int(re.search(r"parameters: ([\d,]+) of", printed).group(1).replace(",", ""))
    active = int(re.search(r"active parameters: ([\d,]+) per token", printed).group(1).replace(",", ""))
    hf = load_hf(out, SHAPE).eval()
    parent = load_hf(hf_dir, SHAPE)
    assert hf.config.moe_intermediate_size < parent.config.moe_intermediate_size
    assert hf.config.moe_shared_expert_intermediate_size < parent.config.moe_shared_expert_intermediate_size
    assert sum(p.numel() for p in hf.parameters()) == total
    c = hf.config
    idle = c.layers_block_type.count("moe") * (c.n_routed_experts - c.num_experts_per_tok)
    assert active == total - idle * 2 * c.hidden_size * c.moe_intermediate_size
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - nestlm.load(out)(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
