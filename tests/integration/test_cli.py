"""The ``nestlm`` command on bad input: one line on stderr naming the file or tensor, exit 2,
no traceback, nothing written. Also --help, and a good ``nestlm generate`` end to end.

Most cases call ``nestlm.cli.main`` in-process (an exception escaping ``main`` fails the
test just as a traceback would); a few run ``python -m nestlm`` in a subprocess to check
the real process too.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nestlm
from nestlm.cli import main
from tests.conftest import dir_state, make_hf

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 101


def write_tokenizer(d: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer.json: "t0" .. "t{vocab-1}", split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_hf(tmp_path_factory.mktemp("good") / "m")
    write_tokenizer(d)
    return d


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(changes)
    (d / "config.json").write_text(json.dumps(raw))


def _edit_tensors(d: Path, fn) -> None:
    f = d / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def _edit_header(d: Path, fn) -> None:
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = fn(data[8 : 8 + n])
    f.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])


def _first_tensor_oob(h: bytes) -> bytes:
    hdr = json.loads(h)
    k = next(k for k in hdr if k != "__metadata__")
    hdr[k]["data_offsets"][1] += 10**6
    return json.dumps(hdr).encode()


def _break(kind: str, d: Path) -> str:
    """Damage the model directory ``d`` in one way; return what the error line must name."""
    f = d / "model.safetensors"
    if kind == "no-config":
        (d / "config.json").unlink()
        return f"{d} has no config.json"
    if kind == "no-directory":
        shutil.rmtree(d)
        return f"{d} does not exist"
    if kind == "model-type":
        _edit_config(d, model_type="gpt2")
        return f"{d / 'config.json'} has model_type 'gpt2'"
    if kind == "moe-layer":  # a MoE layer in the config, an MLP's weights in the file
        _edit_config(d, layers_block_type=["linear_attention", "moe"])
        return "tensor 'layers.1.mixer.gate.weight' is missing from the checkpoint"
    if kind == "unknown-layer":
        _edit_config(d, layers_block_type=["linear_attention", "sliding_attention"])
        return f"{d / 'config.json'}: layer type 'sliding_attention' is not supported"
    if kind == "config-not-json":
        (d / "config.json").write_text('{"model_type": ')
        return f"{d / 'config.json'} is not valid JSON"
    if kind == "config-not-object":
        (d / "config.json").write_text("[1, 2]")
        return f"{d / 'config.json'} holds a JSON list"
    if kind == "config-lacks-key":
        raw = json.loads((d / "config.json").read_text())
        del raw["mamba_num_heads"]
        (d / "config.json").write_text(json.dumps(raw))
        return f"{d / 'config.json'} lacks 'mamba_num_heads'"
    if kind == "missing-tensor":
        _edit_tensors(d, lambda t: t.pop("backbone.layers.0.mixer.A_log"))
        return "tensor 'layers.0.mixer.A_log' is missing"
    if kind == "extra-tensor":
        _edit_tensors(d, lambda t: t.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(3)))
        return "unexpected tensor 'layers.0.mixer.extra' in model.safetensors (as 'backbone.layers.0.mixer.extra')"
    if kind == "wrong-shape":
        _edit_tensors(d, lambda t: t.__setitem__("backbone.layers.1.mixer.up_proj.weight", torch.zeros(7, 48)))
        return (
            "tensor 'layers.1.mixer.up_proj.weight' in model.safetensors "
            "(as 'backbone.layers.1.mixer.up_proj.weight') has shape (7, 48), the config needs (56, 48)"
        )
    if kind == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return f"{f} is not a readable safetensors file"
    if kind == "empty-file":
        f.write_bytes(b"")
        return f"{f} is not a readable safetensors file"
    if kind == "corrupt-header":
        f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
        return f"{f} is not a readable safetensors file"
    if kind == "header-not-json":
        _edit_header(d, lambda h: b"{" * len(h))
        return f"{f} is not a readable safetensors file"
    if kind == "header-offsets":
        _edit_header(d, _first_tensor_oob)
        return f"{f} is not a readable safetensors file"
    if kind == "no-weights":
        f.unlink()
        return f"{d} has no *.safetensors weights"
    if kind == "index-missing-shard":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-2.safetensors"}}))
        return f"{d / 'shard-2.safetensors'} named in the index does not exist"
    if kind == "bad-tokenizer":
        (d / "tokenizer.json").write_text("{}")
        return f"the tokenizer files in {d} cannot be read"
    if kind == "no-tokenizer":
        (d / "tokenizer.json").unlink()
        return f"no tokenizer in {d}"
    if kind == "tokenizer-too-big":
        write_tokenizer(d, vocab=500)
        return "gives token id 300, beyond the model's vocabulary of 101"
    raise AssertionError(kind)


KINDS = [
    "no-config",
    "no-directory",
    "model-type",
    "moe-layer",
    "unknown-layer",
    "config-not-json",
    "config-not-object",
    "config-lacks-key",
    "missing-tensor",
    "extra-tensor",
    "wrong-shape",
    "truncated",
    "empty-file",
    "corrupt-header",
    "header-not-json",
    "header-offsets",
    "no-weights",
    "index-missing-shard",
    "bad-tokenizer",
    "no-tokenizer",
    "tokenizer-too-big",
]


def _damaged(good: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    d = tmp_path / "m"
    shutil.copytree(good, d)
    return d, _break(kind, d)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_model_dir_gives_one_line_and_exit_2(good: Path, tmp_path: Path, kind: str, capsys) -> None:
    d, needle = _damaged(good, tmp_path, kind)
    prompt = "t300 t5" if kind == "tokenizer-too-big" else "t1 t2 t3"
    before = dir_state(tmp_path)
    capsys.readouterr()
    rc = main(["generate", "--model", str(d), "--prompt", prompt, "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nestlm: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert dir_state(tmp_path) == before  # nothing written, nothing touched


@pytest.mark.parametrize("kind", ["wrong-shape"])
def test_bad_model_dir_in_a_real_process(good: Path, tmp_path: Path, kind: str) -> None:
    d, needle = _damaged(good, tmp_path, kind)
    before = dir_state(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "nestlm", "generate", "--model", str(d), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nestlm: error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert dir_state(tmp_path) == before


def test_generate_end_to_end(good: Path, capsys) -> None:
    """A good directory: the printed text is the decoded greedy continuation of the prompt."""
    from tokenizers import Tokenizer

    before = dir_state(good)
    rc = main(["generate", "--model", str(good), "--prompt", "t5 t17 t33 t2", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    model = nestlm.load(good).eval()
    ids = torch.tensor([[5, 17, 33, 2]])
    want = Tokenizer.from_file(str(good / "tokenizer.json")).decode(
        model.generate(ids, max_new_tokens=12)[0, 4:].tolist()
    )
    assert out == want + "\n" and len(want.split()) == 12
    assert dir_state(good) == before


def test_unknown_budget_is_one_line(good: Path, capsys) -> None:
    rc = main(["generate", "--model", str(good), "--prompt", "t1", "--budget", "6b"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown budget '6b'" in err and "not an elastic checkpoint" in err


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["slice", "--help"], ["eval", "--help"]])
def test_help_exits_zero(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nestlm")
    if argv[0] == "generate":
        assert "--model" in out and "--prompt" in out and "--max-new-tokens" in out
    if argv == ["--help"]:
        for cmd in ("importance", "prune", "train", "slice", "eval", "generate", "demo"):
            assert cmd in out


def test_help_in_a_real_process() -> None:
    for argv in (["--help"], ["generate", "--help"]):
        res = subprocess.run([sys.executable, "-m", "nestlm", *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.startswith("usage: nestlm") and res.stderr == "", res.stderr


def test_missing_required_option_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --model" in err and "Traceback" not in err


def test_nestlm_warnings_print_as_one_line() -> None:
    """The CLI prints nestlm's own warnings as `warning: ...` (no source line); others as Python does."""
    from nestlm import cli
    from nestlm.elastic import training

    ours = cli._format_warning(UserWarning("budget '75': moved"), UserWarning, training.__file__, 228, "src()")
    assert ours == "warning: budget '75': moved\n"
    other = cli._format_warning(UserWarning("x"), UserWarning, "/elsewhere/mod.py", 3, "src()")
    assert "UserWarning: x" in other and "/elsewhere/mod.py:3" in other
