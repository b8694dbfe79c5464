"""Round trips and safe writes.

* HF -> ``nestlm.load`` -> ``nestlm.export_hf`` gives bit-identical tensors (same key set,
  same dtype, torch.equal) and identical config.json values, in fp32 and bf16, for several
  shapes, for a sharded source and for an old-style config (hybrid_override_pattern,
  mamba_n_groups, ...); the exported directory loads with plain transformers
  AutoModelForCausalLM and gives the same logits;
* a model made in nestlm (no HF config) exports to a directory transformers loads with the
  same logits, tied or untied;
* ``save_pretrained`` + ``nestlm.load`` is bit-identical (fp32 and bf16, tied and untied);
* a sharded HF checkpoint (save_pretrained(max_shard_size=...)) loads to the same weights;
* writing into a non-empty directory or onto a file refuses and changes nothing; a failure
  in the middle of a write leaves neither the target nor a temporary directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, NemotronHForCausalLM

import nestlm
import nestlm.checkpoint as ck
import nestlm.interop.nemotron_h as nh
from nestlm import CheckpointError, HybridLM, ModelConfig
from tests.conftest import ODD_WIDTHS, A, F, M, dir_state, hf_logits, make_hf

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    "default-g2-gqa": dict(),
    "tied-g1-mha-attn-first": dict(tie=True, n_groups=1, num_key_value_heads=4, layers_block_type=[A, M, M, F]),
    "g3-odd-biases": dict(
        **ODD_WIDTHS,
        layers_block_type=[M, M, A, F, M],
        use_bias=True,
        mlp_bias=True,
        eos_token_id=[2, 7],
    ),
}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files (single or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                assert k not in out, k
                out[k] = sf.get_tensor(k)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _ids(vocab: int, length: int = 33) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------- HF -> nestlm -> HF
@pytest.mark.parametrize("shape", list(SHAPES))
def test_hf_round_trip_is_bit_identical(tmp_path: Path, shape: str) -> None:
    src = make_hf(tmp_path / "src", **SHAPES[shape])
    model = nestlm.load(src)
    assert model.config.tie_embeddings == SHAPES[shape].get("tie", False)
    nestlm.export_hf(model, tmp_path / "back")
    assert_same_tensors(tensors(src), tensors(tmp_path / "back"))
    assert config_json(tmp_path / "back") == config_json(src)
    # the exported directory is a plain transformers checkpoint with the same logits
    hf_src = NemotronHForCausalLM.from_pretrained(src).eval()
    hf_back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(hf_back).__name__ == "NemotronHForCausalLM"
    ids = _ids(model.config.vocab_size)
    ref = hf_logits(hf_src, ids)
    assert torch.equal(hf_logits(hf_back, ids), ref)
    with torch.no_grad():
        assert (model.eval()(ids).logits - ref).abs().max().item() <= 1e-4


def test_bf16_hf_round_trip_is_bit_identical(tmp_path: Path) -> None:
    src = make_hf(tmp_path / "src", dtype=torch.bfloat16)
    assert {t.dtype for t in tensors(src).values()} == {torch.bfloat16}
    model = nestlm.load(src)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    nestlm.export_hf(model, tmp_path / "back")
    assert_same_tensors(tensors(src), tensors(tmp_path / "back"))
    assert config_json(tmp_path / "back") == config_json(src)
    hf_src = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    hf_back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.bfloat16).eval()
    ids = _ids(101)
    assert torch.equal(hf_logits(hf_back, ids), hf_logits(hf_src, ids))
    # nestlm.save_pretrained + load keeps bf16 bit for bit too
    model.save_pretrained(tmp_path / "ours")
    again = nestlm.load(tmp_path / "ours")
    assert_same_tensors(model.state_dict(), again.state_dict())


def test_legacy_config_names_round_trip(tmp_path: Path) -> None:
    """An older config.json (pattern string, mamba_* names, num_hidden_layers) comes back as written."""
    src = make_hf(tmp_path / "src")
    raw = config_json(src)
    types = raw.pop("layers_block_type")
    raw["hybrid_override_pattern"] = "".join({M: "M", A: "*", F: "-"}[t] for t in types)
    raw["num_hidden_layers"] = len(types)
    for new, old in (
        ("n_groups", "mamba_n_groups"),
        ("chunk_size", "mamba_chunk_size"),
        ("conv_kernel", "mamba_d_conv"),
    ):
        raw[old] = raw.pop(new)
    (src / "config.json").write_text(json.dumps(raw, indent=2))
    model = nestlm.load(src)
    assert model.config.pattern == "M-*M-" and model.config.layers[0].groups == 2
    assert model.config.mamba_chunk_size == 16
    nestlm.export_hf(model, tmp_path / "back")
    assert config_json(tmp_path / "back") == raw
    assert_same_tensors(tensors(src), tensors(tmp_path / "back"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _ids(101)
    with torch.no_grad():
        assert (hf_logits(hf, ids) - model.eval()(ids).logits).abs().max().item() <= 1e-4


def test_sharded_hf_checkpoint_loads(tmp_path: Path) -> None:
    src = make_hf(tmp_path / "src")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = nestlm.load(src), nestlm.load(sharded)
    assert_same_tensors(a.state_dict(), b.state_dict())
    assert a.config.to_dict() | {"hf_config": None} == b.config.to_dict() | {"hf_config": None}
    ids = _ids(101)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # exported from the sharded one: the same tensors as the single-file source
    nestlm.export_hf(b, tmp_path / "back")
    assert_same_tensors(tensors(src), tensors(tmp_path / "back"))


# ------------------------------------------------------------------------- nestlm-made models
@pytest.mark.parametrize("tie", [True, False])
def test_native_model_exports_to_transformers(tmp_path: Path, tie: bool) -> None:
    cfg = ModelConfig.from_pattern(
        "*M-M*-",
        vocab_size=77,
        hidden_size=40,
        mamba_heads=6,
        mamba_head_dim=8,
        mamba_groups=3,
        d_state=8,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=10,
        ffn=30,
        tie_embeddings=tie,
        mamba_chunk_size=16,
        init_std=0.2,
    )
    model = HybridLM(cfg).eval()
    model.reset_parameters(seed=1)
    nestlm.export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(77, 50)
    with torch.no_grad():
        diff = (hf_logits(hf, ids) - model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    back = nestlm.load(tmp_path / "hf")
    assert back.config.tie_embeddings == tie
    assert back.config.to_dict() | {"hf_config": None} == cfg.to_dict()
    assert_same_tensors(model.state_dict(), back.state_dict())


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nestlm_save_load_is_bit_identical(tmp_path: Path, tie: bool, dtype: torch.dtype) -> None:
    model = nestlm.load(make_hf(tmp_path / "src", tie=tie, layers_block_type=[A, M, F, M])).to(dtype)
    model.save_pretrained(tmp_path / "ours")
    meta = config_json(tmp_path / "ours")
    assert meta["model_type"] == "nestlm" and meta["config"] == model.config.to_dict()
    again = nestlm.load(tmp_path / "ours")
    assert again.config == model.config
    assert_same_tensors(model.state_dict(), again.state_dict())
    assert ("lm_head.weight" in tensors(tmp_path / "ours")) != tie
    ids = _ids(101)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)
    # and from there back to HF, still the source's tensors
    if dtype == torch.float32:
        nestlm.export_hf(again, tmp_path / "hf")
        assert_same_tensors(tensors(tmp_path / "src"), tensors(tmp_path / "hf"))
        assert config_json(tmp_path / "hf") == config_json(tmp_path / "src")


def test_tokenizer_and_generation_files_travel_with_the_model(tmp_path: Path) -> None:
    src = make_hf(tmp_path / "src")
    (src / "tokenizer.json").write_text('{"x": 1}')
    (src / "tokenizer_config.json").write_text('{"y": 2}')
    gen = (src / "generation_config.json").read_text()
    model = nestlm.load(src)
    model.save_pretrained(tmp_path / "ours")
    nestlm.export_hf(nestlm.load(tmp_path / "ours"), tmp_path / "hf")
    for d in (tmp_path / "ours", tmp_path / "hf"):
        assert (d / "tokenizer.json").read_text() == '{"x": 1}'
        assert (d / "tokenizer_config.json").read_text() == '{"y": 2}'
        assert (d / "generation_config.json").read_text() == gen


# ------------------------------------------------------------------------- safe writes
def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("writer", ["save_pretrained", "export_hf"])
def test_refuses_non_empty_directory_and_files(tmp_path: Path, writer: str) -> None:
    model = nestlm.load(make_hf(tmp_path / "m"))
    write = model.save_pretrained if writer == "save_pretrained" else lambda p: nestlm.export_hf(model, p)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = dir_state(tmp_path)
    with pytest.raises(CheckpointError, match=f"{out} is not empty"):
        write(out)
    assert dir_state(tmp_path) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = dir_state(tmp_path)
    with pytest.raises(CheckpointError, match="exists and is a file"):
        write(afile)
    assert dir_state(tmp_path) == before
    assert (out / "keep.txt").read_text() == "mine" and (out / "config.json").read_text() == "{}"
    _no_leftovers(tmp_path)
    # an empty directory is fine, and is filled in place
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty)
    assert (empty / "config.json").is_file() and nestlm.load(empty).config.n_layers == 5
    _no_leftovers(tmp_path)


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    model = nestlm.load(make_hf(tmp_path / "m"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ck.save_pretrained(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _no_leftovers(tmp_path)


class Boom(Exception):
    pass


@pytest.mark.parametrize("writer", ["save_pretrained", "export_hf"])
@pytest.mark.parametrize("when", ["weights", "config"])
def test_failure_mid_write_leaves_nothing(tmp_path: Path, writer: str, when: str, monkeypatch) -> None:
    model = nestlm.load(make_hf(tmp_path / "m"))
    mod = ck if writer == "save_pretrained" else nh
    if when == "weights":  # half a weights file is on disk when the write fails

        def fail(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 100)
            raise Boom

        monkeypatch.setattr(mod, "save_file", fail)
    else:  # the weights are written, then the config write fails

        def fail(*a, **k):
            raise Boom

        monkeypatch.setattr(mod, "write_json", fail)
    before = dir_state(tmp_path)
    target = tmp_path / "new"
    with pytest.raises(Boom):
        model.save_pretrained(target) if writer == "save_pretrained" else nestlm.export_hf(model, target)
    assert not target.exists()
    assert dir_state(tmp_path) == before
    _no_leftovers(tmp_path)
