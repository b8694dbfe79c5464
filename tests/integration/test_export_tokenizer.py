"""export_hf writes a tokenizer that transformers' AutoTokenizer loads, byte-level included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.tokenizer import ByteTokenizer, load_tokenizer

from ..conftest import make_hf

PARENT = Path(nestlm.__file__).parent / "assets" / "parent"
TEXTS = [
    "hello world",
    "  two  spaces,\ttab\r\nnewline",
    "h\u00e9llo \u20ac \U0001d11e \u65e5\u672c\u8a9e",  # 2-, 3- and 4-byte UTF-8
    "a</s>b<s>c<pad>",  # special tokens' text is bytes, as in ByteTokenizer
    "\x00\x7f\xff",
]


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "parent"
    shutil.copytree(PARENT, src)
    (src / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = tmp_path_factory.mktemp("hf") / "export"
    nestlm.export_hf(nestlm.load(src), out)
    return out


def test_autotokenizer_encodes_and_decodes_like_byte_tokenizer(byte_export: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(byte_export), local_files_only=True)
    ref = ByteTokenizer()
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == ref.vocab_size == 259
    for text in TEXTS:
        ids = ref.encode(text)
        assert hf.encode(text) == ids, text  # add_special_tokens=True adds nothing either
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == ref.decode(ids) == text
        assert hf.decode([1, *ids, 2, 0], skip_special_tokens=True) == text
    broken = [0xE2 + 3, 0x82 + 3, ord("A") + 3]  # a truncated 3-byte sequence: both replace it the same way
    assert hf.decode(broken) == ref.decode(broken)
    assert hf.decode([2], skip_special_tokens=False) == "</s>"
    # nestlm reads the export's tokenizer.json with the same ids
    assert load_tokenizer(byte_export).encode(TEXTS[2]) == ref.encode(TEXTS[2])
    assert load_tokenizer(byte_export).eos_token_id == 2


def test_the_chat_template_is_carried(byte_export: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(byte_export), local_files_only=True)
    text = hf.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<user>2+2?\n<assistant>"


def test_the_export_loads_back_with_the_same_logits(byte_export: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([ByteTokenizer().encode("x = 3 + 4")])
    hf = AutoModelForCausalLM.from_pretrained(str(byte_export)).eval()
    with torch.no_grad():
        ref = nestlm.load(PARENT)(ids).logits
        assert torch.allclose(hf(ids, use_cache=False).logits, ref, atol=1e-4)


def test_hf_tokenizer_files_are_copied(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = make_hf(tmp_path / "src")
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 101)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(src)
    out = tmp_path / "export"
    nestlm.export_hf(nestlm.load(src), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf.encode("w5 w7 w100", add_special_tokens=False) == [5, 7, 100] and hf.eos_token_id == 1


def test_no_tokenizer_source_writes_none(tmp_path: Path) -> None:
    src = make_hf(tmp_path / "src")
    nestlm.export_hf(nestlm.load(src), tmp_path / "export")
    assert not (tmp_path / "export" / "tokenizer.json").exists()
