"""``nestlm export-hf``: an elastic model as ONE Hugging Face directory holding every budget.

Three families are exported: the trained tiny elastic hybrid of tests/data/elastic-v1 (plus two budgets that
drop layer 0, narrow Mamba head_dim, cut KV heads and differ per layer), a NemotronH MoE hybrid and a Llama parent
(and a Qwen3 one: q/k norms, biases, tied embeddings), with budgets frozen from ArchSpecs. One fresh Python, in
which ``import nestlm`` fails (tests/hf_family_check.py), loads them with transformers alone:

1. with trust_remote_code, every budget's logits equal nestlm's (1e-4, fp32), greedy generate(budget=) gives
   nestlm's tokens, cached decode equals the uncached forward, seeded sampling repeats, left padding changes
   nothing; an unknown budget is an error listing the known ones; the model card's AutoTokenizer snippet runs;
2. without it, the directory is the plain family class with the full model's logits (1e-4);
3. the weights are one copy (safetensors bytes within 5% of the model's), in fp32 and in bf16 (--dtype), and
   large models are sharded with an index (--max-shard-size);
4. save_pretrained(dir, budget=) writes a plain standalone directory that loads without remote code with that
   budget's logits (1e-4) and exactly its parameter count (a per-layer budget is refused in one line);
5. every refusal of the command is one line, exit 2, nothing written.
``nestlm.load`` reads the directory back with its budgets, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm import ArchSpec, Budget
from nestlm.cli import main
from nestlm.elastic.arch import count_parameters
from tests.conftest import A, M, dir_state, make_hf
from tests.moe_models import make_moe
from tests.pipeline import pattern_tokens, rank, train_tiny
from tests.transformer_models import LLAMA3, make_shape, make_transformer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
ELASTIC = ROOT / "tests" / "data" / "elastic-v1"
CHECK = ROOT / "tests" / "hf_family_check.py"


def add_budget(model: nestlm.HybridLM, name: str, spec: ArchSpec) -> None:
    cfg = model.config
    n = spec.num_parameters(cfg)
    active = spec.active_parameters(cfg)
    model.elastic[name] = Budget(name, "test", spec, n, n / count_parameters(cfg), active_params=active)


def hybrid() -> nestlm.HybridLM:
    """The trained elastic hybrid (budgets full, 75, 50) and two more: layer 0 dropped; per-layer widths with a
    narrower Mamba head_dim, one KV head, an MLP and a Mamba layer dropped."""
    m = nestlm.load(ELASTIC)
    full = ArchSpec.full(m.config)
    add_budget(m, "drop0", full.replace(m.config, drop_layers=[0], hidden=24, mlp=48))
    layers = [{"heads": 2, "head_dim": 4}, {"ffn": 16}, {"heads": 1, "kv_heads": 1}, {"heads": 4}, None]
    add_budget(m, "mixed", ArchSpec.per_layer(m.config, 16, layers))
    return m


def moe(tmp: Path) -> nestlm.HybridLM:
    src = make_moe(
        tmp / "moe-src",
        layers_block_type=[M, "moe", A, M, "moe"],
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=20,
    )
    m = nestlm.load(src)
    full = ArchSpec.full(m.config)
    add_budget(m, "full", full)
    add_budget(m, "half", full.replace(m.config, hidden=32, experts=4, expert_ffn=16, shared_ffn=12, mamba_heads=4))
    add_budget(m, "drop0", full.replace(m.config, drop_layers=[0], experts=6, expert_ffn=8, attn_heads=2))
    return m


def transformer(tmp: Path, shape: str) -> nestlm.HybridLM:
    m = nestlm.load(make_shape(tmp / f"{shape}-src", shape))
    full = ArchSpec.full(m.config)
    add_budget(m, "full", full)
    add_budget(m, "small", full.replace(m.config, hidden=24, attn_heads=2, kv_heads=2, mlp=24))
    add_budget(m, "blocks", full.replace(m.config, attn_heads=1, kv_heads=1, drop_layers=[0, 5]))  # half layers
    add_budget(m, "depth", full.replace(m.config, drop_layers=[4, 5], mlp=16))
    return m


def references(model: nestlm.HybridLM, path: Path) -> Path:
    """What nestlm computes for each budget (None: the full model): logits and greedy tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 37), generator=g)  # over two Mamba chunks
    prompt = ids[:, :7]
    eos = model.config.eos_token_id
    ref = {"ids": ids, "prompt": prompt, "eos": [] if eos is None else [eos] if isinstance(eos, int) else eos}
    ref["logits"], ref["greedy"] = {}, {}
    with torch.no_grad():
        for b in [None, *model.budgets]:
            ref["logits"][str(b)] = model(ids, budget=b).logits
            ref["greedy"][str(b)] = model.generate(prompt, max_new_tokens=6, budget=b)
    ref["params"] = {b: model.budget(b).params for b in model.budgets}
    torch.save(ref, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every family exported (the hybrid also in bf16 through the command), then checked in one fresh Python."""
    tmp = tmp_path_factory.mktemp("family")
    models = {"hybrid": hybrid(), "moe": moe(tmp), "llama": transformer(tmp, "llama-gqa-untied-llama3-rope_scaling")}
    models["qwen3"] = transformer(tmp, "qwen3-mha-qknorm-bias")
    spec: dict = {"families": {}, "bf16": {}, "snippet": []}
    for name, m in models.items():
        nestlm.export_hf(m, tmp / name)
        spec["families"][name] = {"dir": str(tmp / name), "ref": str(references(m, tmp / f"{name}.pt"))}
    # bf16 through the command; its reference is nestlm's own bf16 model
    ck = tmp / "hybrid-ck"
    models["hybrid"].save_pretrained(ck)
    assert main(["export-hf", "--model", str(ck), "--out", str(tmp / "bf16"), "--dtype", "bfloat16"]) == 0
    ref_bf16 = references(nestlm.load(ck).to(torch.bfloat16), tmp / "bf16.pt")
    spec["bf16"]["hybrid"] = {"dir": str(tmp / "bf16"), "ref": str(ref_bf16)}
    spec["snippet"] = [str(tmp / "hybrid")]
    return {"tmp": tmp, "models": models, "out": run_check(tmp, spec)}


def run_check(tmp: Path, spec: dict) -> dict:
    """tests/hf_family_check.py on ``spec`` in a fresh Python (nestlm blocked, its own modules cache)."""
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(CHECK), str(tmp / "spec.json"), str(tmp / "out.json")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def test_every_budget_runs_in_transformers_without_nestlm(exported: dict) -> None:
    out = exported["out"]
    assert out["nestlm_importable"] is False and out["nestlm_modules"] == []
    for name, res in out["families"].items():
        model = exported["models"][name]
        assert res["class"].startswith("transformers_modules.") and res["class"].endswith("ForCausalLM"), res
        assert res["budgets"] == model.budgets
        for b, r in res["per_budget"].items():
            where = f"{name} budget {b}: {r}"
            assert r["logits"] <= 1e-4 and r["cache"] <= 1e-4, where
            assert r["greedy_equal"] and r["sampling"] and r["padding_equal"], where
        known = ", ".join(repr(b) for b in model.budgets)
        assert res["unknown_budget"] == [f"unknown budget 'nope'; known budgets: {known}"] * 2


def test_budgets_are_really_different(exported: dict) -> None:
    ref = torch.load(exported["tmp"] / "hybrid.pt")
    full = ref["logits"]["None"]
    for b in ("75", "50", "drop0", "mixed"):
        assert (ref["logits"][b] - full).abs().max() > 1e-2, b


def test_the_model_card_snippet_runs(exported: dict) -> None:
    (snippet,) = exported["out"]["snippet"].values()
    assert snippet["class"] == "NestedNemotronHForCausalLM", snippet
    assert snippet["prompt"] < snippet["generated"] <= snippet["prompt"] + 64, snippet
    card = (exported["tmp"] / "hybrid" / "README.md").read_text()
    for b in exported["models"]["hybrid"].budgets:
        assert f"| `{b}` | {exported['models']['hybrid'].budget(b).params:,} |" in card


def test_without_remote_code_it_is_the_plain_parent(exported: dict) -> None:
    for name, res in exported["out"]["families"].items():
        family = {"llama": "llama", "qwen3": "qwen3"}.get(name, "nemotron_h")
        assert res["plain_class"].startswith(f"transformers.models.{family}."), res["plain_class"]
        assert res["plain_logits"] <= 1e-4, (name, res["plain_logits"])


@pytest.mark.parametrize("name", ["hybrid", "moe", "llama", "qwen3"])
def test_weights_are_one_copy(exported: dict, name: str) -> None:
    d, model = exported["tmp"] / name, exported["models"][name]
    files = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    state = model.state_dict()
    if "lm_head.weight" not in state and name in ("hybrid", "moe"):  # NemotronH files always hold an lm_head
        state["lm_head.weight"] = state["embeddings.weight"]
    weights = sum(t.numel() * t.element_size() for t in state.values())
    assert abs(files / weights - 1) < 0.05, (files, weights)
    raw = json.loads((d / "config.json").read_text())
    assert set(raw["nestlm_budgets"]) == set(model.budgets) and raw["auto_map"]["AutoModelForCausalLM"]
    for b, rec in raw["nestlm_budgets"].items():
        assert rec["params"] == model.budget(b).params and rec["active_params"] == model.budget(b).active_params
    assert {"configuration_nestlm.py", "modeling_nestlm.py", "nested.py", "generation_config.json"} <= {
        p.name for p in d.iterdir()
    }


def test_bf16_export_loads_and_runs(exported: dict) -> None:
    d = exported["tmp"] / "bf16"
    files = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    weights = sum(t.numel() * 2 for t in exported["models"]["hybrid"].state_dict().values())
    assert abs(files / weights - 1) < 0.05 and json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    res = exported["out"]["bf16"]["hybrid"]
    assert res["dtype"] == "torch.bfloat16"
    for b, r in res["per_budget"].items():
        assert r["rel"] < 0.03 and r["new"] == 7 + 4, (b, r)


def test_a_budget_alone_loads_without_remote_code(exported: dict) -> None:
    for name, res in exported["out"]["families"].items():
        model = exported["models"][name]
        for b, r in res["standalone"].items():
            if b == "mixed" or (b == "blocks" and name in ("llama", "qwen3")):  # no plain-format equivalent
                assert "can run only as a budget of this model" in r["error"], r
                continue
            assert r["logits"] <= 1e-4, (name, b, r)
            assert r["params"] == model.budget(b).params, (name, b, r)
            assert r["class"].startswith("transformers.models.") and r["custom"] == [], r
            assert not any(f.endswith(".py") for f in r["files"]), r
    assert "tokenizer.json" in exported["out"]["families"]["hybrid"]["standalone"]["50"]["files"]


def test_nestlm_load_reads_the_family_back(exported: dict) -> None:
    for name in ("hybrid", "moe", "llama"):
        model, back = exported["models"][name], nestlm.load(exported["tmp"] / name)
        assert back.budgets == model.budgets
        ids = torch.randint(3, model.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for b in model.budgets:
                assert back.budget(b).arch == model.budget(b).arch and back.budget(b).params == model.budget(b).params
                assert torch.equal(back(ids, budget=b).logits, model(ids, budget=b).logits), (name, b)
    # and a budget sliced from it is a plain directory again (no custom code, no budgets)
    back = nestlm.load(exported["tmp"] / "hybrid")
    nestlm.export_hf(back.slice("50"), exported["tmp"] / "sliced")
    raw = json.loads((exported["tmp"] / "sliced" / "config.json").read_text())
    assert not {"auto_map", "nestlm_budgets", "nestlm_parent"} & set(raw)


def test_large_weights_are_sharded_with_an_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(ELASTIC), "--out", str(out), "--max-shard-size", "64KB"]) == 0
    assert "3 budgets" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == set(shards), shards
    ids = torch.randint(3, 259, (1, 11))
    ref, back = nestlm.load(ELASTIC), nestlm.load(out)
    with torch.no_grad():
        assert torch.equal(back(ids, budget="50").logits, ref(ids, budget="50").logits)


def _refused(capsys, tmp_path: Path, argv: list[str], needle: str) -> None:
    before = dir_state(tmp_path)
    capsys.readouterr()
    rc = main(["export-hf", *argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("nestlm: error: ") and needle in lines[0], err
    assert "Traceback" not in err and out == ""
    assert dir_state(tmp_path) == before


def test_refusals_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain = make_hf(tmp_path / "plain")
    _refused(capsys, tmp_path, ["--model", str(plain), "--out", str(tmp_path / "o")], "plain model without budgets")
    # a parent with no Hugging Face family (SwiGLU and RoPE, built in nestlm) but with budgets
    shape = dict(vocab_size=50, hidden_size=16, attn_heads=2, kv_heads=1, attn_head_dim=8, ffn=24)
    cfg = nestlm.ModelConfig.from_pattern("*-*-", **shape, mlp_act="swiglu", rope_theta=10000.0)
    m = nestlm.HybridLM(cfg)
    add_budget(m, "half", ArchSpec.full(cfg).replace(cfg, mlp=12))
    m.save_pretrained(tmp_path / "swiglu")
    _refused(capsys, tmp_path, ["--model", str(tmp_path / "swiglu"), "--out", str(tmp_path / "o")], "no Hugging Face")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    _refused(capsys, tmp_path, ["--model", str(ELASTIC), "--out", str(tmp_path / "taken")], "not empty")
    (tmp_path / "mixtral").mkdir()
    (tmp_path / "mixtral" / "config.json").write_text('{"model_type": "mixtral"}')
    _refused(capsys, tmp_path, ["--model", str(tmp_path / "mixtral"), "--out", str(tmp_path / "o")], "mixtral")
    argv = ["--model", str(ELASTIC), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]
    _refused(capsys, tmp_path, argv, "is not a size")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["moe", "llama"])
def test_a_trained_family_through_the_commands(tmp_path: Path, family: str) -> None:
    """importance -> two-stage elastic training -> export-hf, all by the CLI; then the same checks as above."""
    if family == "moe":
        shape = dict(n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=16)
        hf = make_moe(tmp_path / "hf", seed=2, layers_block_type=[M, "moe", A, M, "moe"], **shape)
        axes = {"hidden": [1.0, 0.75], "moe_experts": [1.0, 4, 2], "moe_ffn": [1.0, 0.5], "mamba_heads": [1.0, 0.5]}
        elastic = {"budgets": {"full": 1.0, "small": "active=0.7"}, "axes": axes, "d_router": 32}
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, rope=LLAMA3, spelling="rope_scaling")
        hf = make_transformer(tmp_path / "hf", "llama", initializer_range=0.05, **kw)
        axes = {"hidden": [1.0, 0.75, 0.5], "attn_heads": [1.0, 0.5], "mlp": [1.0, 0.75, 0.5, 0.25]}
        elastic = {"budgets": {"full": 1.0, "60": 0.6}, "axes": axes, "d_router": 32}
    data, _ = pattern_tokens(tmp_path / "tokens.jsonl")
    run = train_tiny(tmp_path, f"{family}-tiny", rank(hf, data, tmp_path / "ranked"), data, elastic)
    assert main(["export-hf", "--model", str(run), "--out", str(tmp_path / "family")]) == 0
    model = nestlm.load(run).eval()
    spec = {"families": {family: {"dir": str(tmp_path / "family"), "ref": str(references(model, tmp_path / "r.pt"))}}}
    res = run_check(tmp_path, spec)["families"][family]
    assert res["budgets"] == model.budgets
    for b, r in res["per_budget"].items():
        assert r["logits"] <= 1e-4 and r["cache"] <= 1e-4 and r["greedy_equal"] and r["sampling"], (b, r)
    assert res["plain_logits"] <= 1e-4
    for b, r in res["standalone"].items():
        assert r["logits"] <= 1e-4 and r["params"] == model.budget(b).params, (b, r)
    assert "val_loss" in (tmp_path / "family" / "README.md").read_text()  # the run's last validation
