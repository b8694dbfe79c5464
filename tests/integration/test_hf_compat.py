"""What nestlm writes in Hugging Face format runs in the installed transformers, as transformers runs it.

* pruned MoE parents get widths that transformers' default experts kernel (grouped_mm, rows of
  16 bytes) takes, and `nestlm prune` reaches every budget between the smallest sub-network and the
  parent within its tolerance;
* a model whose first layer is an MLP or MoE block (a budget that drops the first Mamba layer)
  runs in plain transformers with nestlm's logits and greedy tokens, even where transformers'
  cache cannot hold such a model (5.23 to 5.25: the export then says use_cache: false).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import nestlm
from nestlm.cli import main
from nestlm.config import ModelConfig
from nestlm.elastic.arch import closest_homogeneous, count_parameters, parse_target
from nestlm.interop.probe import transformers_fails_first_layer
from tests.conftest import A, M
from tests.moe_models import make_moe

pytestmark = pytest.mark.usefixtures("one_thread")
E = "moe"
# the two small MoE parents of the CI issue: widths that are multiples of 8, experts of 40 and of 24
PARENTS = {
    "h72-8x40-top2-2groups": dict(
        hidden_size=72,
        n_routed_experts=8,
        moe_intermediate_size=40,
        moe_shared_expert_intermediate_size=40,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        layers_block_type=[M, E, A, E],
    ),
    "h64-6x24-top3": dict(
        hidden_size=64,
        n_routed_experts=6,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=24,
        num_experts_per_tok=3,
        layers_block_type=[M, E, A, E],
    ),
}


def _ids(vocab: int, n: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _channel_widths(cfg: ModelConfig) -> list[int]:
    out = [cfg.hidden_size]
    for ls in cfg.layers:
        out += [ls.ffn] if ls.kind == "mlp" else [ls.ffn, ls.shared_ffn] if ls.kind == "moe" else []
    return out


@pytest.mark.parametrize("name", list(PARENTS))
def test_prune_reaches_every_budget_in_range_with_kernel_widths(tmp_path: Path, name: str) -> None:
    model = nestlm.load(make_moe(tmp_path / "hf", seed=1, **PARENTS[name]))
    cfg, total = model.config, count_parameters(model.config)
    for b in [0.3 + 0.05 * i for i in range(14)]:  # 0.30 .. 0.95
        spec = closest_homogeneous(cfg, parse_target(f"{b:.2f}"))
        assert abs(spec.num_parameters(cfg) / (b * total) - 1) <= 0.02, (b, spec.describe())
        small = spec.to_config(cfg)
        assert all(w % 8 == 0 for w in _channel_widths(small)), (b, spec.describe())


@pytest.mark.parametrize("name", list(PARENTS))
def test_pruned_moe_runs_in_transformers_default_experts_kernel(tmp_path: Path, name: str, capsys) -> None:
    """`nestlm prune --budget 0.6 --format hf`: 60% within 2%, and transformers (grouped_mm experts, its
    default) gives nestlm's logits."""
    src = make_moe(tmp_path / "hf", seed=1, **PARENTS[name])
    out, ranked, data = tmp_path / "pruned", tmp_path / "ranked", tmp_path / "calib.jsonl"
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 101, (80,), generator=g).tolist()} for _ in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["importance", "--model", str(src), "--data", str(data), "--out", str(ranked), "--seq-len", "64"]
    assert main(argv + ["--no-depth"]) == 0
    capsys.readouterr()
    assert main(["prune", "--model", str(ranked), "--budget", "0.6", "--out", str(out), "--format", "hf"]) == 0
    printed = capsys.readouterr().out
    frac = float(re.search(r"\(([\d.]+)%; target", printed).group(1)) / 100
    assert abs(frac / 0.6 - 1) <= 0.02, printed
    raw = json.loads((out / "config.json").read_text())
    assert all(raw[k] % 8 == 0 for k in ("hidden_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # the default experts implementation
    ids = _ids(raw["vocab_size"])
    with torch.no_grad():
        diff = (hf(ids).logits - nestlm.load(out)(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("first", ["-M*E", "EM*-"])
def test_an_mlp_or_moe_first_model_runs_in_transformers(tmp_path: Path, first: str, capsys) -> None:
    cfg = ModelConfig.from_pattern(
        first,
        vocab_size=50,
        hidden_size=32,
        mamba_heads=4,
        mamba_head_dim=8,
        mamba_groups=1,
        d_state=8,
        attn_heads=2,
        kv_heads=1,
        attn_head_dim=16,
        ffn=32,
        experts=4,
        expert_ffn=16,
        shared_ffn=16,
        init_std=0.2,
    )
    torch.manual_seed(0)
    model = nestlm.HybridLM(cfg).eval()
    nestlm.export_hf(model, tmp_path / "hf")
    broken = transformers_fails_first_layer(cfg.layers[0].kind)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw.get("use_cache", True) is (broken is None)
    assert ("use_cache: false" in capsys.readouterr().err) is (broken is not None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(50, length=9)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
        assert torch.equal(hf.generate(ids, max_new_tokens=8, do_sample=False), model.generate(ids, max_new_tokens=8))
