"""The training checkpointer: save, restore, resume and retention of a run's checkpoints.

A run directory holds ``checkpoints/step-NNNNNNNN/`` directories, each written atomically:
model.safetensors, the routers (through the checkpoint owner), optimizer.safetensors +
optimizer.json (flattened AdamW state), rng.safetensors and state.json (written last: it
marks a complete checkpoint). Only the last ``keep_last`` are kept. On resume, lines of
metrics.jsonl logged after the restored step are dropped, so a resumed run's metrics read
as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_dir, read_routers, write_json, write_routers
from .distributed import DistInfo

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint."""

    global_step: int = 0
    stage: int = 0
    stage_step: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    budget_rng: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step losses (for exact-resume checks)


def python_rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def python_rng_from_json(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def _all_modules(model: torch.nn.Module, routers: torch.nn.Module | None) -> torch.nn.Module:
    """Model and routers under one root, so that every optimized parameter has a name."""
    mods = {"model": model}
    if routers is not None:
        mods["routers"] = routers
    return torch.nn.ModuleDict(mods)


class Checkpointer:
    """Checkpoints of one run directory (``out/checkpoints``)."""

    def __init__(self, out: Path, keep_last: int, dist: DistInfo) -> None:
        self.dir = Path(out) / CHECKPOINTS
        self.metrics = Path(out) / METRICS
        self.keep_last = keep_last
        self.dist = dist

    def latest(self) -> Path | None:
        if not self.dir.is_dir():
            return None
        steps = sorted(
            p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
        )
        return steps[-1] if steps else None

    def optimizer_state(
        self, model: torch.nn.Module, routers: torch.nn.Module | None, opt: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The optimizer's full state, flattened into tensors + JSON (rank 0 only under FSDP)."""
        if self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            sd = get_optimizer_state_dict(
                _all_modules(model, routers), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            sd = opt.state_dict()
        if not self.dist.is_main:  # full state dicts land on rank 0 only
            return {}, {}
        tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
        for pid, st in sd["state"].items():
            meta["state_keys"][str(pid)] = list(st)
            for k, v in st.items():
                tensors[f"{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        return tensors, meta

    def save(
        self,
        model_sd: dict[str, torch.Tensor],
        routers: torch.nn.Module | None,
        opt_sd: tuple[dict[str, torch.Tensor], dict[str, Any]],
        gumbel: torch.Generator,
        state: TrainState,
    ) -> None:
        """Write checkpoint step-<global_step> (rank 0), then drop all but the last ``keep_last``."""
        if not self.dist.is_main:
            return
        path = self.dir / f"step-{state.global_step:08d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path, overwrite=True) as tmp:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            if routers is not None:
                write_routers(tmp, routers.state_dict())
            tensors, meta = opt_sd
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            rng = {"torch": torch.get_rng_state(), "gumbel": gumbel.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / STATE_FILE, state.__dict__)  # written last: marks a complete checkpoint
        kept = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in kept[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(
        self,
        model: torch.nn.Module,
        routers: torch.nn.Module | None,
        opt: torch.optim.Optimizer,
        gumbel: torch.Generator,
    ) -> TrainState:
        """Load the latest complete checkpoint into model, routers, optimizer and RNGs; its TrainState."""
        path = self.latest()
        assert path is not None
        for p in self.dir.iterdir():  # leftovers of a write that was killed
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if routers is not None:
            routers.load_state_dict(read_routers(path))
        meta = json.loads((path / "optimizer.json").read_text())
        flat = load_file(str(path / "optimizer.safetensors"))
        opt_state = {}
        for pid, keys in meta["state_keys"].items():
            key = int(pid) if pid.isdigit() else pid
            opt_state[key] = {k: flat[f"{pid}.{k}"] for k in keys}
        sd = {"state": opt_state, "param_groups": meta["param_groups"]}
        if self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                _all_modules(model, routers), opt, sd, options=StateDictOptions(full_state_dict=True)
            )
        else:
            opt.load_state_dict(sd)
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        gumbel.set_state(rng["gumbel"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        self._trim_metrics(state.global_step)
        return state

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics lines logged after the checkpoint we resume from."""
        if not (self.dist.is_main and self.metrics.is_file()):
            return
        keep = [ln for ln in self.metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        tmp = self.metrics.with_name(".metrics.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.metrics)
