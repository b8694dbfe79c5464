"""`nestlm train RECIPE --dry-run`: the per-rank memory plan, on the meta device, for the 12B recipe."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from nestlm.cli import main
from nestlm.elastic.arch import count_parameters
from nestlm.train.plan import GIB, parent_config
from nestlm.train.recipe import load_recipe

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "nemotron-nano-12b-v2-elastic.yaml")


def test_12b_plan_at_64_ranks(capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", RECIPE, "--dry-run", "--world-size", "64"]) == 3  # stage 2 needs context parallelism
    out, err = capsys.readouterr()
    assert (
        err == "nestlm: stage 2 (long-context) does not fit in 80 GiB per GPU at world size 64 (exit status 3; "
        "see the plan above)\n"
    )
    assert "per rank at world size 64 on 80 GiB GPUs" in out
    cfg = parent_config(load_recipe(RECIPE))
    n = count_parameters(cfg)  # arch.py's exact count agrees with the meta-device model
    assert f"parent: {n:,} parameters, 62 layers, hidden 5120, vocab 131072" in out
    assert "global batch 1536 = micro-batch 1 x 24 accumulation steps x 64 ranks" in out
    assert "global batch 256 = micro-batch 1 x 4 accumulation steps x 64 ranks" in out
    shard = float(re.search(r"parameters \(fp32 master\)\s+([\d.]+) GiB", out).group(1))
    assert shard == pytest.approx(4 * math.ceil(n / 64) / GIB, abs=0.006)
    for part in ("gradients (fp32)", "optimizer (AdamW m, v fp32)", "activations / micro-batch", "loss chunk"):
        assert out.count(part) == 2, part
    assert not any(tmp_path.iterdir())  # nothing written


def test_plan_refuses_a_world_size_the_batch_does_not_divide(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", RECIPE, "--dry-run", "--world-size", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global_batch 1536" in err[0] and err[0].startswith("nestlm: error: ")


def test_activations_grow_with_the_micro_batch_and_checkpointing_saves(capsys: pytest.CaptureFixture) -> None:
    def act(*ov: str) -> float:  # on GPUs large enough that every stage fits (exit 0): the parts do not depend on it
        assert main(["train", RECIPE, "--dry-run", "--world-size", "64", "--gpu-memory", "1000", *ov]) == 0
        return float(re.search(r"activations / micro-batch\s+([\d.]+) GiB", capsys.readouterr().out).group(1))

    one = act()
    assert act("stages.0.micro_batch=2") == pytest.approx(2 * one, rel=1e-3)
    assert act("train.activation_checkpointing=false") > 3 * one


def test_train_without_out_needs_dry_run(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "tiny"]) == 2
    assert "--out" in capsys.readouterr().err


def test_importance_device_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--device cpu runs (and says so); --device cuda without a GPU is one line, exit 2, nothing written."""
    import torch

    from nestlm.checkpoint import save_pretrained
    from nestlm.tokenizer import ByteTokenizer
    from nestlm.train import setup

    parent = tmp_path / "parent"
    save_pretrained(setup.build_parent(load_recipe("tiny")), parent, tokenizer=ByteTokenizer())
    args = ["importance", "--model", str(parent), "--data", "stdlib", "--max-bytes", "20000", "--seq-len", "32"]
    args += ["--num-samples", "8", "--batch-size", "4", "--no-depth"]
    assert main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert "importance: on cpu" in capsys.readouterr().out and (tmp_path / "cpu" / "config.json").is_file()
    if not torch.cuda.is_available():
        assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU" in err[0] and not (tmp_path / "gpu").exists()


def test_soft_masks_cost_one_more_copy_of_the_masked_tensors(capsys: pytest.CaptureFixture) -> None:
    """elastic.mask: soft adds a plan line; hard masks and fixed architectures do not."""

    def soft(*ov: str) -> float | None:
        assert main(["train", RECIPE, "--dry-run", "--world-size", "64", "--gpu-memory", "1000", *ov]) == 0
        m = re.search(r"soft masks / micro-batch\s+([\d.]+) GiB", capsys.readouterr().out)
        return None if m is None else float(m.group(1))

    assert soft("elastic.mask=hard") is None and soft("elastic.mask=soft", "elastic.router=fixed") is None
    cfg = parent_config(load_recipe(RECIPE))
    # checkpointed: one recomputed block's masked tensors (x2 for its backward), the widest kind (MLP)
    mlp = max(ls.ffn for ls in cfg.layers if ls.kind == "mlp")
    tokens = 8192  # stage 0: micro-batch 1 x 8192
    assert soft("elastic.mask=soft") == pytest.approx(2 * 2 * (cfg.hidden_size + mlp) * tokens / GIB, abs=0.006)


def test_context_parallel_plan_fits_the_paper_on_one_node(capsys: pytest.CaptureFixture) -> None:
    """train.context_parallel=8 on 8 ranks: every sequence in 8 parts; both stages fit in 80 GiB per GPU."""

    def plan(*ov: str, code: int = 0) -> str:
        assert main(["train", RECIPE, "--dry-run", *ov]) == code
        return capsys.readouterr().out

    out = plan("--world-size", "8", "train.context_parallel=8")
    assert "FSDP2 over 8 ranks as 8-rank context groups" in out
    assert "global batch 256 = micro-batch 1 x 256 accumulation steps x 1 data-parallel ranks (x 8 context)" in out
    assert out.count("-> fits in 80 GiB") == 2 and out.count("context-parallel exchange") == 2
    one = plan("--world-size", "8", code=3)  # exit 3: a stage does not fit
    act = [float(x) for x in re.findall(r"activations / micro-batch\s+([\d.]+) GiB", one)]
    act_cp = [float(x) for x in re.findall(r"activations / micro-batch\s+([\d.]+) GiB", out)]
    assert act_cp == pytest.approx([a / 8 for a in act], abs=0.01)  # each rank holds 1/8 of every sequence
    assert "does NOT fit" in one  # stage 2 without context parallelism
    assert main(["train", RECIPE, "--dry-run", "--world-size", "12", "train.context_parallel=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.context_parallel 8 must divide the world size 12" in err[0]
