"""nestlm checkpoint directories: the one module that reads and writes their files.

Layout of a nestlm directory:
  config.json           {"model_type": "nestlm", "format_version": 1, "config": ModelConfig}
  model.safetensors     the state dict (no lm_head when tied); metadata: its tensors' sha256, checked on load
  importance.json       (ranked models) the Importance scores and layer order
  elastic.json          (elastic checkpoints) every Budget: target, frozen ArchSpec, exact total and active counts
  routers.safetensors   (elastic checkpoints) the trained routers' weights
  tokenizer files       carried over from the source directory (see TOKENIZER_FILES)
Every write goes to a temporary sibling directory that is renamed into place, so a
reader never sees a half-written checkpoint and a failed write leaves nothing behind.

It never imports the model: it writes any object with ``state_dict()``, ``config``, ``elastic``, ``importance``
and ``source_dir``, and reads a directory into ``NestlmFiles``, which ``nestlm.loading.load`` makes a HybridLM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .elastic.arch import ArchSpec, count_parameters
from .elastic.importance import Importance
from .errors import CheckpointError, NestlmError
from .outputs import io_error_line, writing  # noqa: F401  (io_error_line: re-exported)
from .tokenizer import BYTE_TOKENIZER_FILE, HF_TOKENIZER_FILES

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ELASTIC_FILE = "elastic.json"
IMPORTANCE_FILE = "importance.json"
ROUTERS_FILE = "routers.safetensors"
DIGEST_KEY = "nestlm_sha256"  # weight-file metadata: tensors_digest of its tensors
TOKENIZER_FILES = (
    *HF_TOKENIZER_FILES,  # the Hugging Face tokenizer files (one list, in tokenizer.py)
    "chat_template.json",
    BYTE_TOKENIZER_FILE,  # nestlm's marker for the byte-level tokenizer
    "generation_config.json",  # generation defaults (EOS ids) that transformers' generate reads
)


@dataclass(frozen=True)
class Budget:
    """One frozen budget of an elastic checkpoint (a record of elastic.json)."""

    name: str
    target: str  # as the recipe gave it: "0.5", "6e9", "12GB", "1.0"
    arch: ArchSpec  # the frozen architecture
    params: int  # its exact parameter count
    fraction: float  # params / the parent's
    target_description: str = ""
    memory_bytes: int | None = None
    active_params: int | None = None  # parameters per token (MoE: top-k routed experts); = params without MoE
    # learned routers: True when the frozen architecture is the routers' own (argmax) choice, False when that
    # lay outside the tolerance and freezing took the most probable choice within it (a sub-network training
    # seldom ran: a failed run, said loudly at freezing); None for fixed, full and older records
    own_choice: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.own_choice is None else {"own_choice": self.own_choice}
        return extra | {
            "target": self.target,
            "target_description": self.target_description,
            "arch": self.arch.to_dict(),
            "params": self.params,
            "active_params": self.active_params,
            "fraction": self.fraction,
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any], config: ModelConfig) -> Budget:
        arch = ArchSpec.from_dict(d["arch"], config)
        params = int(d["params"]) if d.get("params") is not None else arch.num_parameters(config)
        fraction = float(d["fraction"]) if d.get("fraction") is not None else params / count_parameters(config)
        active = d.get("active_params")  # absent from files written before MoE parents: counted
        return cls(
            name=name,
            target=str(d.get("target", "")),
            arch=arch,
            params=params,
            fraction=fraction,
            target_description=str(d.get("target_description", "")),
            memory_bytes=d.get("memory_bytes"),
            active_params=arch.active_parameters(config) if active is None else int(active),
            own_choice=d.get("own_choice"),
        )


@dataclass
class NestlmFiles:
    """What a nestlm directory holds, read and checked (the model is built from it by nestlm.load)."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    where: dict[str, str]  # tensor name -> file it came from
    budgets: dict[str, Budget]
    importance: Importance | None


def require_new_dir(
    path: str | os.PathLike, label: str = "--out", error: type[NestlmError] = NestlmError, not_empty: str | None = None
) -> Path:
    """The one check for "an output directory must be new": not a file, and empty if it exists."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise error(f"{label} {p} exists and is a file; give a directory")
    if p.is_dir() and any(p.iterdir()):
        raise error(not_empty or f"{label} {p} is not empty; choose a new directory (nothing is overwritten)")
    return p


def save_tensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, a failed write being one OutputError line naming the file."""
    with writing(file):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    if overwrite:
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"output {path} exists and is a file; give a directory path")
    else:
        require_new_dir(path, "output directory", CheckpointError)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            _default_permissions(tmp)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "d")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _keep(src: Path, dst: Path) -> None:
    """A second name for ``src`` (a copy where the filesystem has no hard links)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _default_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories (and safetensors 0600 files); give the umask's defaults instead."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def copy_tokenizer(src: str | os.PathLike | None, dst: Path) -> None:
    """Copy every tokenizer and generation-config file of directory ``src`` into ``dst``."""
    if not src:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of ``tensors`` (recorded in a weight file's metadata)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def read_config_json(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give a model directory holding config.json")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a nestlm or Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object with model_type")
    return raw


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a directory's single or sharded safetensors files, and the file of each."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
    else:
        # model weights only: an elastic checkpoint keeps its routers in routers.safetensors
        files = sorted(p.name for p in path.glob("*.safetensors") if p.name != ROUTERS_FILE)
        if not files:
            raise CheckpointError(f"{path} has no *.safetensors weights (nor model.safetensors.index.json)")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"weight file {f} named in the index does not exist")
        try:
            with safe_open(str(f), framework="pt") as sf:
                mine = {}
                for key in sf.keys():
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears in both {where[key]} and {name}")
                    mine[key] = tensors[key] = sf.get_tensor(key)
                    where[key] = name
                digest = (sf.metadata() or {}).get(DIGEST_KEY)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {msg}") from None
        if digest is not None and tensors_digest(mine) != digest:
            raise CheckpointError(
                f"{f} is corrupt: its tensors do not match the sha256 recorded when it was written (a flipped bit?)"
            )
    return tensors, where


def check_state_dict(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    where: Callable[[str], str],
    optional: set[str] = frozenset(),
) -> None:
    """Raise a one-line CheckpointError naming the first missing, extra or misshapen tensor."""
    expected = model.state_dict()
    for key in expected:
        if key not in tensors and key not in optional:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
    for key, t in tensors.items():
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key!r} in {where(key)} (the config has no such weight)")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {key!r} in {where(key)} has shape {tuple(t.shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )


def _write_files(
    model: Any,
    d: Path,
    routers: dict[str, torch.Tensor] | None,
    tokenizer: Any,
    extra: dict[str, Any] | None,
) -> None:
    """Every file of a nestlm directory into ``d`` (config.json last)."""
    sd = model.state_dict()
    save_tensors(sd, d / WEIGHTS_FILE, metadata={"format": "pt", DIGEST_KEY: tensors_digest(sd)})
    if getattr(model, "importance", None) is not None:
        write_json(d / IMPORTANCE_FILE, model.importance.to_dict())
    if getattr(model, "elastic", None):
        write_json(d / ELASTIC_FILE, {name: b.to_dict() for name, b in model.elastic.items()})
    if routers is not None:
        write_routers(d, routers)
    for name, data in (extra or {}).items():
        write_json(d / name, data)
    copy_tokenizer(getattr(model, "source_dir", None), d)
    if getattr(model, "chat_template", None):  # the template the model was trained with (data.chat_template)
        (d / "chat_template.jinja").write_text(model.chat_template)
    if tokenizer is not None and hasattr(tokenizer, "to_json") and not (d / BYTE_TOKENIZER_FILE).is_file():
        write_json(d / BYTE_TOKENIZER_FILE, tokenizer.to_json())
    write_json(
        d / CONFIG_FILE, {"model_type": "nestlm", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    )


def save_pretrained(
    model: Any,
    path: str | os.PathLike,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    routers: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
) -> None:
    """Write ``model`` (a HybridLM) as a nestlm directory, atomically.

    Weights, config, importance, budgets, the routers' state dict (``routers``), and the
    tokenizer files of the directory the model came from; ``tokenizer`` (a ByteTokenizer)
    writes nestlm's byte-tokenizer marker when the source has none.
    """
    with atomic_dir(path, overwrite=overwrite) as tmp:
        _write_files(model, tmp, routers, tokenizer, extra)


def save_into(
    model: Any, path: str | os.PathLike, routers: dict[str, torch.Tensor] | None = None, tokenizer: Any = None
) -> None:
    """Write the model files into an existing directory (a training run's), config.json last: a reader
    that finds config.json finds a complete model (see atomic_files)."""
    with atomic_files(path, ".final-tmp", last=CONFIG_FILE) as tmp:
        _write_files(model, tmp, routers, tokenizer, None)


@contextmanager
def atomic_files(path: str | os.PathLike, tmp_name: str, last: str | None = None) -> Iterator[Path]:
    """Yield ``path/tmp_name``, a new temporary directory; if the block succeeds, each file written there is
    renamed over its namesake in ``path`` (``last`` last), other files of ``path`` untouched. A failure in the
    block or in a rename leaves the files of ``path`` as they were (those replaced are put back) and no
    temporary directory: ``path`` holds the new files or the previous ones, never a mix."""
    path = Path(path)
    tmp, done = path / tmp_name, []
    with writing(path):
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed write's leftover
            (tmp / ".old").mkdir(parents=True)
            yield tmp
            _default_permissions(tmp)
            for n in sorted((p.name for p in tmp.iterdir() if p.name != ".old"), key=lambda n: (n == last, n)):
                if (path / n).is_file():  # keep the previous file, to put back on failure
                    _keep(path / n, tmp / ".old" / n)
                os.replace(tmp / n, path / n)
                done.append(n)
        except BaseException:
            for n in reversed(done):  # best effort: the error reported is the first one
                with contextlib.suppress(OSError):
                    if (tmp / ".old" / n).is_file():
                        os.replace(tmp / ".old" / n, path / n)
                    else:
                        (path / n).unlink()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_routers(d: Path, state: dict[str, torch.Tensor]) -> None:
    """The routers' state dict as routers.safetensors in directory ``d``."""
    save_tensors(state, Path(d) / ROUTERS_FILE)


def read_routers(d: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The routers' state dict of directory ``d`` (an elastic checkpoint or a training checkpoint), or None."""
    f = Path(d) / ROUTERS_FILE
    if not f.is_file():
        return None
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{f} is not a readable safetensors file: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None


def read_nestlm_config(path: Path, raw: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a nestlm directory (``raw``: its config.json, if already read)."""
    raw = read_config_json(path) if raw is None else raw
    if not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE} has no 'config' object (the nestlm ModelConfig)")
    try:
        return ModelConfig.from_dict(raw["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None


def read_nestlm(path: Path, raw: dict[str, Any]) -> NestlmFiles:
    """Read and check a nestlm directory whose config.json is ``raw``."""
    cfg = read_nestlm_config(path, raw)
    tensors, where = read_safetensors(path)
    return NestlmFiles(cfg, tensors, where, read_budgets(path, cfg), read_importance(path))


def read_importance(path: Path) -> Importance | None:
    f = path / IMPORTANCE_FILE
    if not f.is_file():
        return None
    try:
        return Importance.from_dict(json.loads(f.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{f} is not a valid importance file: {e!r}") from None


def read_budgets(path: str | os.PathLike, cfg: ModelConfig | None = None) -> dict[str, Budget]:
    """The frozen budgets of elastic.json ({} when the directory has none); ``cfg`` read from config.json if None."""
    path = Path(path)
    f = path / ELASTIC_FILE
    if not f.is_file():
        return {}
    if cfg is None:
        cfg = read_nestlm_config(path)
    try:
        data = json.loads(f.read_text())
        return {name: Budget.from_dict(name, b, cfg) for name, b in data.items()}
    except NestlmError as e:
        raise CheckpointError(f"{f}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{f} is not a valid elastic.json: {e!r}") from None
