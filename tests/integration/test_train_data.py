"""Training on prepared (memory-mapped) data and on blends of sources, per stage."""

from __future__ import annotations

import json
from pathlib import Path

from nestlm.tokenizer import ByteTokenizer
from nestlm.train.recipe import load_recipe
from nestlm.train.shards import prepare
from nestlm.train.trainer import train

FAST = ["stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=0"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_prepared_data_trains_like_its_source(tmp_path: Path) -> None:
    prepare(["stdlib"], tmp_path / "prep", ByteTokenizer(), "bytes", max_bytes=40000)
    a, b = tmp_path / "raw", tmp_path / "mm"
    train(load_recipe("tiny", [*FAST, "data.max_bytes=40000"]), a, progress=False)
    train(load_recipe("tiny", [*FAST, f"data.train={tmp_path / 'prep'}"]), b, progress=False)
    la = [r["loss"] for r in _rows(a) if "loss" in r]
    lb = [r["loss"] for r in _rows(b) if "loss" in r]
    assert len(la) == 5 and la == lb  # the same tokens in the same order: identical losses


def test_a_stage_blends_long_and_short_reasoning(tmp_path: Path) -> None:
    blend = "[{path: 'reasoning:long', weight: 0.7}, {path: 'reasoning:short', weight: 0.3}]"
    ov = ["data.train=reasoning:short", "data.packing=rows", "data.loss=completion", "data.num_problems=60"]
    out = tmp_path / "run"
    train(load_recipe("tiny", [*FAST, *ov, f"stages.1.data={blend}"]), out, progress=False)
    rows = _rows(out)
    assert [r["stage"] for r in rows if "loss" in r] == ["short"] * 3 + ["long"] * 2
    assert (out / "model.safetensors").is_file()
    saved = (out / "recipe.yaml").read_text()
    assert "reasoning:long" in saved and "weight: 0.7" in saved


def test_resume_on_prepared_data_continues_at_the_same_token(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    prep = tmp_path / "prep"
    prepare(["stdlib"], prep, ByteTokenizer(), "bytes", max_bytes=40000)
    ov = ["stages.0.steps=6", "stages.1.steps=2", "train.checkpoint_every=3", f"data.train={prep}"]
    whole = tmp_path / "whole"
    train(load_recipe("tiny", ov), whole, progress=False)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "nestlm", "train", "tiny", "--out", str(out), "--no-progress", *ov]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "checkpoints" / "step-00000003" / "state.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.time() - t0 < 300, "timed out waiting for the step-3 checkpoint"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    train(load_recipe("tiny", ov), out, resume=True, progress=False)
    la = [r["loss"] for r in _rows(whole) if "loss" in r]
    lb = [r["loss"] for r in _rows(out) if "loss" in r]
    assert len(la) == 8 and la == lb  # the resumed run read the same tokens from step 4 on
