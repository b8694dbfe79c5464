"""NemotronH MoE features nestlm does not compute are refused: one line naming them, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nestlm
from tests.conftest import assert_refused_in_one_line
from tests.moe_models import SHAPES, make_moe


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_moe(tmp_path_factory.mktemp("good") / "moe", **SHAPES["g4-top2groups-k3-norm-scaled"])


def _edit(d: Path, **kw) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(kw)
    (d / "config.json").write_text(json.dumps(raw))


CASES = {
    "latent": ({"moe_latent_size": 16}, "moe_latent_size 16 (latent expert projections, Nemotron 3 Super)"),
    "two-shared": ({"n_shared_experts": 2}, "n_shared_experts 2 is not supported"),
    "groups-uneven": ({"n_group": 3, "topk_group": 1}, "8 routed experts do not split into moe_n_group=3 groups"),
    "top-k-past-groups": (
        {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
        "moe_top_k=3 exceeds the 2 experts that moe_topk_group=1 of 4 groups of 2 hold",
    ),
    "topk-group-past-groups": ({"n_group": 2, "topk_group": 3}, "moe_topk_group (3) exceeds moe_n_group (2)"),
    "expert-act": ({"mlp_hidden_act": "silu"}, "mlp_hidden_act 'silu' is not supported (only relu2)"),
    "no-expert-count": ({"n_routed_experts": None}, "lacks 'n_routed_experts'"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["importance", "generate"])
def test_unsupported_moe_feature_is_one_line_exit_2_nothing_written(
    moe_dir: Path, tmp_path: Path, case: str, command: str, capsys
) -> None:
    edits, needle = CASES[case]
    d = tmp_path / "m"
    shutil.copytree(moe_dir, d)
    raw = json.loads((d / "config.json").read_text())
    raw.update(edits)
    raw = {k: v for k, v in raw.items() if v is not None}
    (d / "config.json").write_text(json.dumps(raw))
    assert_refused_in_one_line(capsys, tmp_path, d, command, needle)


def test_mtp_layers_are_dropped_with_one_line(moe_dir: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "m"
    shutil.copytree(moe_dir, d)
    _edit(d, num_nextn_predict_layers=1)
    sd = load_file(str(d / "model.safetensors"))
    sd["mtp.layers.0.norm.weight"] = torch.ones(48)
    save_file(sd, str(d / "model.safetensors"))
    capsys.readouterr()
    model = nestlm.load(d)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multi-token-prediction layer(s) (mtp.*) are dropped" in err, err
    ref = nestlm.load(moe_dir)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    out = tmp_path / "hf"
    nestlm.export_hf(model, out)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
