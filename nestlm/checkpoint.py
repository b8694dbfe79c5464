"""nestlm checkpoint directories: safetensors weights + JSON config, written atomically.

Layout of a nestlm directory:
  config.json         {"model_type": "nestlm", "format_version": 1, "config": ModelConfig}
  model.safetensors   the state dict (no lm_head when embeddings are tied)
  elastic.json        (elastic checkpoints) every budget's target, frozen ArchSpec, count
  tokenizer files     carried over from the source directory when present
Every write goes to a temporary sibling directory that is renamed into place, so a
reader never sees a half-written checkpoint and a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .errors import CheckpointError, NestlmError

FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",  # generation defaults (EOS ids) that transformers' generate reads
)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output {path} exists and is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {path} is not empty; choose a new directory or remove it")
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
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def copy_tokenizer(src: str | os.PathLike | None, dst: Path) -> None:
    if not src:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


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
        files = sorted(p.name for p in path.glob("*.safetensors") if p.name != "routers.safetensors")
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
                for key in sf.keys():
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears in both {where[key]} and {name}")
                    tensors[key] = sf.get_tensor(key)
                    where[key] = name
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {msg}") from None
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
                f"tensor {key!r} in {where(key)} has shape {tuple(t.shape)}, the config needs {tuple(expected[key].shape)}"
            )


def save_pretrained(
    model: Any, path: str | os.PathLike, overwrite: bool = False, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model`` (a HybridLM) as a nestlm directory."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(
            tmp / "config.json",
            {"model_type": "nestlm", "format_version": FORMAT_VERSION, "config": model.config.to_dict()},
        )
        if getattr(model, "importance", None) is not None:
            write_json(tmp / "importance.json", model.importance.to_dict())
        if model.elastic:
            write_json(tmp / "elastic.json", {name: _budget_to_json(b) for name, b in model.elastic.items()})
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        copy_tokenizer(model.source_dir, tmp)


def _budget_to_json(b: dict[str, Any]) -> dict[str, Any]:
    out = dict(b)
    out["arch"] = b["arch"].to_dict()
    return out


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Any:
    """Load a nestlm directory (plain, elastic or sliced) or a Hugging Face directory: NemotronH,
    llama, mistral, qwen2 or qwen3."""
    from .model import HybridLM

    path = Path(path)
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    if model_type == "nestlm":
        if not isinstance(raw.get("config"), dict):
            raise CheckpointError(f"{path / 'config.json'} has no 'config' object (the nestlm ModelConfig)")
        try:
            cfg = ModelConfig.from_dict(raw["config"])
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        tensors, where = read_safetensors(path)
        with torch.device("meta"):
            model = HybridLM(cfg)
        check_state_dict(model, tensors, lambda k: where[k])
        model.load_state_dict(tensors, assign=True)
        model.elastic = _read_elastic(path, cfg)
        if (path / "importance.json").is_file():
            from .elastic.importance import Importance

            try:
                model.importance = Importance.load(path / "importance.json")
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{path / 'importance.json'} is not a valid importance file: {e!r}") from None
    else:  # Hugging Face formats; unknown model types are refused there, in one line
        from .interop import load_hf

        model = load_hf(path, raw)
    model.source_dir = str(path)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def _read_elastic(path: Path, cfg: ModelConfig) -> dict[str, Any]:
    f = path / "elastic.json"
    if not f.is_file():
        return {}
    from .elastic.arch import ArchSpec

    try:
        data = json.loads(f.read_text())
        out = {}
        for name, b in data.items():
            b = dict(b)
            b["arch"] = ArchSpec.from_dict(b["arch"], cfg)
            out[name] = b
    except NestlmError as e:
        raise CheckpointError(f"{f}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{f} is not a valid elastic.json: {e!r}") from None
    return out
