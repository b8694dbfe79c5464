"""Round trips (HF -> nestlm -> HF, nestlm -> nestlm) and bad checkpoints through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import nestlm
from nestlm.cli import main
from tests.conftest import make_hf


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_round_trip_is_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    src = make_hf(tmp_path / "src")
    if dtype != torch.float32:  # re-save the checkpoint in bf16
        m = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        src = tmp_path / "src16"
        m.save_pretrained(src)
    model = nestlm.load(src)
    nestlm.export_hf(model, tmp_path / "back")
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    ids = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        assert (hf(ids).logits - model.float()(ids).logits).abs().max().item() <= 1e-4


def test_nestlm_round_trip_and_sharded_hf(tmp_path: Path) -> None:
    src = make_hf(tmp_path / "src")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = nestlm.load(src)
    b = nestlm.load(sharded)
    a.save_pretrained(tmp_path / "ours")
    c = nestlm.load(tmp_path / "ours")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.to_dict() == c.config.to_dict()


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nestlm", *args], capture_output=True, text=True, timeout=120)


def _listing(p: Path) -> dict[str, int]:
    return {str(q): q.stat().st_mtime_ns for q in p.rglob("*")}


def _break(kind: str, d: Path) -> str:
    """Damage checkpoint directory d; return a piece of the expected message."""
    f = d / "model.safetensors"
    if kind == "no-config":
        (d / "config.json").unlink()
        return "has no config.json"
    if kind == "model-type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))
        return "model_type 'llama'"
    t = load_file(str(f))
    if kind == "missing":
        del t["backbone.layers.0.mixer.A_log"]
        save_file(t, str(f))
        return "'layers.0.mixer.A_log' is missing"
    if kind == "extra":
        t["backbone.layers.0.mixer.extra"] = torch.zeros(3)
        save_file(t, str(f))
        return "unexpected tensor 'layers.0.mixer.extra'"
    if kind == "shape":
        t["backbone.layers.1.mixer.up_proj.weight"] = torch.zeros(7, 48)
        save_file(t, str(f))
        return "'layers.1.mixer.up_proj.weight' in model.safetensors"
    if kind == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return "model.safetensors is not a readable safetensors file"
    if kind == "corrupt":
        f.write_bytes(b"\xff" * 64)
        return "model.safetensors is not a readable safetensors file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no-config", "model-type", "missing", "extra", "shape", "truncated", "corrupt"])
def test_bad_checkpoints_give_one_line(tmp_path: Path, kind: str) -> None:
    d = make_hf(tmp_path / "m")
    needle = _break(kind, d)
    (d / "tokenizer.json").write_text("{}")
    before = _listing(tmp_path)
    res = _cli(["generate", "--model", str(d), "--prompt", "hi"])
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nestlm: error:"), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert _listing(tmp_path) == before  # nothing written


def test_no_overwrite_and_no_leftovers(tmp_path: Path) -> None:
    model = nestlm.load(make_hf(tmp_path / "m"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(nestlm.CheckpointError, match="not empty"):
        model.save_pretrained(out)
    with pytest.raises(nestlm.CheckpointError, match="not empty"):
        nestlm.export_hf(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    import nestlm.checkpoint as ck

    orig = ck.write_json
    ck.write_json = fail
    try:
        with pytest.raises(Boom):
            model.save_pretrained(tmp_path / "new")
    finally:
        ck.write_json = orig
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_help_exits_zero() -> None:
    for args in (["--help"], ["generate", "--help"], ["train", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0
