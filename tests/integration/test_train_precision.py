"""Mixed precision: fp32 master weights and optimizer state, bf16 compute, a bf16 frozen teacher; no fp16."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from nestlm.checkpoint import save_pretrained
from nestlm.cli import main
from nestlm.tokenizer import ByteTokenizer
from nestlm.train import setup
from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import Trainer, train


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def bf16_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's parent stored in bf16, with tied embeddings (every weight gets a gradient)."""
    r = load_recipe("tiny", ["model.init.tie_embeddings=true"])
    model = setup.build_parent(r).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("bf16") / "parent"
    save_pretrained(model, path, tokenizer=ByteTokenizer())
    return path


class MatmulDtypes(TorchDispatchMode):
    """Counts the matrix products run (forward and backward, as the kernels see them), by input dtype."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[torch.dtype] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            self.seen[args[-1].dtype] += 1
        return func(*args, **(kwargs or {}))


def run(parent: Path, out: Path, dtype: str) -> tuple[list[float], dict[str, torch.Tensor], Counter[torch.dtype]]:
    """The losses, the final weights, and the matrix products the run computed, by dtype."""
    ov = ["model.init=null", f"model.path={parent}", "data.tokenizer=bytes", "data.max_bytes=60000"]
    ov += ["train.mode=plain", "train.lr=1e-5", "train.weight_decay=0", f"train.dtype={dtype}", "train.threads=1"]
    ov += ["train.checkpoint_every=0", "stages.0.steps=6", "stages.1.steps=4", "stages.0.warmup_steps=0"]
    with MatmulDtypes() as products:
        train(load_recipe("tiny", ov), out, progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    return [r["loss"] for r in rows], weights(out), products.seen


def test_bf16_parent_trains_with_fp32_master_weights(bf16_parent: Path, tmp_path: Path) -> None:
    start = {k: v.float() for k, v in weights(bf16_parent).items()}
    assert all(v.dtype == torch.bfloat16 for v in weights(bf16_parent).values())
    l16, w16, mm16 = run(bf16_parent, tmp_path / "bf16", "bfloat16")
    l32, w32, mm32 = run(bf16_parent, tmp_path / "fp32", "float32")
    # bf16 compute really ran: the bf16 run's matrix products (forward and backward) are bf16 (all of them
    # today; 10% is left to products kept in fp32 on purpose), the fp32 run's none, and both ran the same ones
    print(f"matrix products by dtype: bf16 run {dict(mm16)}, fp32 run {dict(mm32)}")
    assert mm32[torch.bfloat16] == 0 and mm32[torch.float32] > 0
    assert mm16[torch.bfloat16] >= 0.9 * sum(mm16.values()) and sum(mm16.values()) == sum(mm32.values()), mm16
    assert len(l16) == 10 and w16.keys() == start.keys()
    assert all(v.dtype == torch.float32 for v in w16.values())  # the master copy, not bf16
    changed = sum(int((w16[k] != start[k]).sum()) for k in start) / sum(v.numel() for v in start.values())
    loss_diff = max(abs(a - b) / b for a, b in zip(l16, l32, strict=True))
    print(f"bf16 run changed {changed:.4%} of the master weights; max relative loss diff to fp32 {loss_diff:.2e}")
    assert changed >= 0.99, changed
    # bf16 compute follows the fp32 run: losses within bf16 rounding, and the same weight updates
    assert loss_diff <= 1e-2, (l16, l32)
    d16 = torch.cat([(w16[k] - start[k]).flatten() for k in start])
    d32 = torch.cat([(w32[k] - start[k]).flatten() for k in start])
    cos, ratio = float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)), float(d16.norm() / d32.norm())
    print(f"weight changes bf16 vs fp32: cosine {cos:.4f}, norm ratio {ratio:.4f}")
    assert cos >= 0.95 and abs(ratio - 1) <= 0.05


def test_teacher_is_bf16_without_gradients_and_student_fp32(bf16_parent: Path, tmp_path: Path) -> None:
    ov = ["model.init=null", f"model.path={bf16_parent}", "data.tokenizer=bytes", "data.max_bytes=30000"]
    ov += ["train.dtype=bfloat16", "elastic.budgets={full: 1.0}", "elastic.axes={}"]
    ov += ["stages.1.budget_probs=uniform"]
    t = Trainer(load_recipe("tiny", ov), tmp_path / "run", progress=False)
    assert {p.dtype for p in t.teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in t.teacher.parameters())
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    assert t.precision.compute == torch.bfloat16 and t.precision.mp_policy() is None  # one process: autocast


def test_fp16_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fp16"
    assert main(["train", "tiny", "--out", str(out), "train.dtype=float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nestlm: error: train.dtype float16") and "bfloat16" in err[0]
    assert not out.exists()
