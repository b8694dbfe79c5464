"""The training checkpointer: sharded save, verified restore, resume and retention of a run's checkpoints.

A run directory holds ``checkpoints/step-NNNNNNNN/`` directories:
  dcp/              torch.distributed.checkpoint: every rank writes its own shards of the model,
                    the routers and the AdamW state (``__RANK_0.distcp``, plus ``.metadata``); no
                    rank ever gathers the full state, and any world size can load it back
  rng.safetensors   the torch and Gumbel generators (rank 0's; every rank restores them)
  checksums.json    sha256 of every file above, each rank hashing the files it wrote
  state.json        where the run stands
Every rank writes into ``.step-NNNNNNNN.tmp``; once all have finished rank 0 renames it into place, so
a checkpoint is visible only once every rank has finished writing it. Only the last
``keep_last`` are kept. ``--resume`` verifies the latest checkpoint's checksums, and falls
back to the one before when it is truncated or corrupt (moving the bad one to
``corrupt-step-N``). Checkpoints of the earlier single-file format (model.safetensors,
optimizer.safetensors + optimizer.json) still resume. On resume, lines of metrics.jsonl
logged after the restored step are dropped, so a resumed run's metrics read as if it had
never stopped; so is a line cut off mid-write (a killed run, a full disk), with one note.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint import read_routers, save_tensors, write_json, writing
from ..errors import CheckpointError, OutputError
from .distributed import DistInfo, all_gather_objects, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
CHECKSUMS = "checksums.json"
DCP_DIR = "dcp"
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


def all_modules(model: torch.nn.Module, routers: torch.nn.Module | None) -> torch.nn.Module:
    """Model and routers under one root, so that every optimized parameter has a name."""
    mods = {"model": model}
    if routers is not None:
        mods["routers"] = routers
    return torch.nn.ModuleDict(mods)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Why checkpoint ``path`` is not good ([] when its files match their checksums); rank's share of the files."""
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        return []  # written before checksums existed: trusted as before
    try:
        sums = json.loads(sums_file.read_text())
    except (ValueError, OSError) as e:
        return [f"{sums_file} is unreadable ({e})"] if rank == 0 else []
    bad = []
    for name, digest in sorted(sums.items())[rank::world]:
        f = path / name
        if not f.is_file():
            bad.append(f"{f} is missing")
        elif sha256(f) != digest:
            bad.append(f"{f} does not match its checksum (truncated or corrupt)")
    return bad


@contextmanager
def quiet_dcp() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it runs in one process when no process group exists."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _attempt(fn: Callable[[], Any], where: Path) -> str | None:
    """Run ``fn``; the one-line reason it could not write (disk full, read-only, ...), or None."""
    try:
        with writing(where):
            fn()
    except OutputError as e:
        return str(e)
    return None


class Checkpointer:
    """Checkpoints of one run directory (``out/checkpoints``)."""

    def __init__(self, out: Path, keep_last: int, dist: DistInfo) -> None:
        self.dir = Path(out) / CHECKPOINTS
        self.metrics = Path(out) / METRICS
        self.keep_last = keep_last
        self.dist = dist

    def complete(self) -> list[Path]:
        """Every complete checkpoint, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(
            p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
        )

    def latest(self) -> Path | None:
        steps = self.complete()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(
        self,
        model: torch.nn.Module,
        routers: torch.nn.Module | None,
        opt: torch.optim.Optimizer,
        gumbel: torch.Generator,
        state: TrainState,
    ) -> Path:
        """Write checkpoint step-<global_step> (every rank its shards), then keep only the last ``keep_last``.

        A write that fails on any rank (disk full, read-only) fails on every rank with one
        OutputError, and leaves no partial checkpoint behind.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step-{state.global_step:08d}"
        path, tmp = self.dir / name, self.dir / f".{name}.tmp"
        err: str | None = None
        if self.dist.is_main:
            err = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), (tmp / DCP_DIR).mkdir(parents=True)), tmp)
        err = broadcast_object(err, self.dist)
        sums: dict[str, str] | str = {}
        if err is None:
            msd, osd = get_state_dict(all_modules(model, routers), opt)  # this rank's shards only
            solo, sd = not self.dist.enabled, {"model": msd, "optim": osd}
            with quiet_dcp():
                err = _attempt(lambda: dcp.save(sd, checkpoint_id=tmp / DCP_DIR, no_dist=solo), tmp)
            if err is None:  # each rank hashes the files it wrote
                mine = [f for f in sorted((tmp / DCP_DIR).iterdir()) if f.name.startswith(f"__{self.dist.rank}_")]
                sums = {f"{DCP_DIR}/{f.name}": sha256(f) for f in mine}
            parts = all_gather_objects(err or sums, self.dist)
            if self.dist.is_main:
                err = next((p for p in parts if isinstance(p, str)), None)
                if err is None:
                    sums = {k: v for p in parts for k, v in p.items()}
                    err = _attempt(lambda: self._finish(tmp, path, gumbel, state, sums), tmp)
                if err is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            err = broadcast_object(err, self.dist)
        if err is not None:
            raise OutputError(err)
        return path

    def _finish(self, tmp: Path, path: Path, gumbel: torch.Generator, state: TrainState, sums: dict) -> None:
        """Rank 0: the RNGs, checksums and state.json, then the rename that makes the checkpoint visible."""
        rng = {"torch": torch.get_rng_state(), "gumbel": gumbel.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_tensors(rng, tmp / "rng.safetensors")
        sums[f"{DCP_DIR}/.metadata"] = sha256(tmp / DCP_DIR / ".metadata")
        sums["rng.safetensors"] = sha256(tmp / "rng.safetensors")
        write_json(tmp / CHECKSUMS, sums)
        write_json(tmp / STATE_FILE, state.__dict__)
        if path.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
        kept = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in kept[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # --------------------------------------------------------------- restore
    def pick(self) -> Path:
        """The latest checkpoint whose checksums hold; every rank checks a share of its files."""
        if self.dist.is_main:
            for p in self.dir.iterdir():  # leftovers of a write that was killed
                if p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)
        cands = broadcast_object([str(p) for p in self.complete()] if self.dist.is_main else None, self.dist)
        problems: list[str] = []
        for cand in map(Path, reversed(cands)):
            share = verify(cand, self.dist.rank, self.dist.world)
            bad = [b for part in all_gather_objects(share, self.dist) for b in part]
            if not bad:
                return cand
            problems += bad
            if self.dist.is_main:
                aside = cand.with_name(f"corrupt-{cand.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(cand, aside)
                print(
                    f"nestlm: checkpoint {cand.name} is corrupt ({bad[0]}); moved to {aside.name}, "
                    "falling back to the one before",
                    file=sys.stderr,
                    flush=True,
                )
            barrier(self.dist)
        raise CheckpointError(f"--resume: no good checkpoint: {'; '.join(problems)}; start again in a new --out")

    def restore(
        self,
        model: torch.nn.Module,
        routers: torch.nn.Module | None,
        opt: torch.optim.Optimizer,
        gumbel: torch.Generator,
    ) -> TrainState:
        """Load the latest good checkpoint into model, routers, optimizer and RNGs; its TrainState."""
        path = self.pick()
        mods = all_modules(model, routers)
        if (path / DCP_DIR).is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(mods, opt)
            sd = {"model": msd, "optim": osd}
            with quiet_dcp():
                dcp.load(sd, checkpoint_id=path / DCP_DIR, no_dist=not self.dist.enabled)
            set_state_dict(mods, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            _restore_single_file(path, model, routers, opt, mods, self.dist)
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        gumbel.set_state(rng["gumbel"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        self._trim_metrics(state.global_step)
        barrier(self.dist)
        return state

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics lines logged after the checkpoint we resume from (and a torn last line)."""
        if not (self.dist.is_main and self.metrics.is_file()):
            return
        keep = [ln for ln, rec in metric_lines(self.metrics) if rec.get("step", 0) <= step]
        tmp = self.metrics.with_name(".metrics.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.metrics)


def metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every JSON object line of a metrics.jsonl ([] when there is none).

    The file is appended in place, so a run killed mid-write (or out of disk) leaves its last line cut
    off: such a line, and any other that is not a JSON object, is dropped with one note on stderr."""
    if not path.is_file():
        return []
    good, bad = [], []
    lines = path.read_bytes().decode("utf-8", "replace").split("\n")
    for i, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln) if ln.strip() else None
        except ValueError:  # JSONDecodeError
            rec = None
        if isinstance(rec, dict):
            good.append((ln, rec))
        elif ln.strip():
            bad.append(i)
    if bad:
        last = bad == [len(lines)]  # the last line (the file ends without its newline): torn by a stopped write
        what = f"its last line (line {bad[0]}), cut off mid-write" if last else f"line(s) {bad} (not JSON records)"
        print(f"nestlm: note: {path}: dropped {what}", file=sys.stderr, flush=True)
    return good


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order (see metric_lines: a torn line is dropped)."""
    return [rec for _, rec in metric_lines(Path(path))]


def _restore_single_file(
    path: Path,
    model: torch.nn.Module,
    routers: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    mods: torch.nn.Module,
    dist: DistInfo,
) -> None:
    """The earlier format: full tensors in model.safetensors, flattened AdamW state (every rank reads them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    model_sd = load_file(str(path / "model.safetensors"))
    routers_sd = read_routers(path) if routers is not None else None
    meta = json.loads((path / "optimizer.json").read_text())
    flat = load_file(str(path / "optimizer.safetensors"))
    opt_state = {}
    for pid, keys in meta["state_keys"].items():
        key = int(pid) if pid.isdigit() else pid
        opt_state[key] = {k: flat[f"{pid}.{k}"] for k in keys}
    sd = {"state": opt_state, "param_groups": meta["param_groups"]}
    if not dist.enabled:
        model.load_state_dict(model_sd)
        if routers is not None:
            routers.load_state_dict(routers_sd)
        opt.load_state_dict(sd)
        return
    full = StateDictOptions(full_state_dict=True)  # full tensors into the sharded model (no DTensor mix-up)
    set_model_state_dict(model, model_sd, options=full)
    if routers is not None:
        routers.load_state_dict(routers_sd)
    set_optimizer_state_dict(mods, opt, sd, options=full)


def export_state(path: Path, model: torch.nn.Module, routers: torch.nn.Module | None) -> None:
    """Load a training checkpoint's model and router weights into plain (unsharded) modules, one process."""
    bad = verify(path)
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: {'; '.join(bad)}")
    if not (path / DCP_DIR).is_dir():
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if routers is not None:
            routers.load_state_dict(read_routers(path))
        return
    import torch.distributed.checkpoint as dcp

    sd = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    if routers is not None:
        sd["model"] |= {f"routers.{k}": v for k, v in routers.state_dict().items()}
    with quiet_dcp():
        dcp.load(sd, checkpoint_id=path / DCP_DIR, no_dist=True)
    model.load_state_dict({k[6:]: v for k, v in sd["model"].items() if k.startswith("model.")})
    if routers is not None:
        routers.load_state_dict({k[8:]: v for k, v in sd["model"].items() if k.startswith("routers.")})
