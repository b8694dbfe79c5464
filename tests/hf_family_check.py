"""Run in a fresh Python where ``import nestlm`` fails: load exported family directories with transformers only.

``python tests/hf_family_check.py SPEC.json OUT.json``. SPEC lists directories with the references nestlm
computed (a torch file: input ids, logits and greedy tokens per budget); OUT receives what transformers gave.
The test (tests/integration/test_export_family.py) asserts on OUT. Imports: torch and transformers only.
"""

import sys

sys.modules["nestlm"] = None  # any `import nestlm` below (ours or the exported code's) raises ImportError

import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def trim(rows, eos):
    """Each row up to and including its first EOS (both sides pad differently after it)."""
    out = []
    for row in rows.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def check_family(d, ref):
    """Every budget through AutoModelForCausalLM(trust_remote_code=True), then the plain load, then standalones."""
    ids, prompt, eos = ref["ids"], ref["prompt"], ref["eos"]
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    res = {"class": type(hf).__module__ + "." + type(hf).__name__, "budgets": hf.budgets, "per_budget": {}}
    with torch.no_grad():
        for b in [None, *hf.budgets]:
            r = {"logits": max_diff(hf(ids, budget=b).logits, ref["logits"][str(b)])}
            out = hf.generate(prompt, max_new_tokens=6, do_sample=False, budget=b)
            r["greedy_equal"] = trim(out, eos) == trim(ref["greedy"][str(b)], eos)
            # cached decode (each step's logits from generate) against the uncached forward of the whole sequence
            gen = hf.generate(prompt, max_new_tokens=6, budget=b, output_logits=True, return_dict_in_generate=True)
            full = hf(gen.sequences, budget=b, use_cache=False).logits
            p = prompt.shape[1]
            r["cache"] = max(max_diff(step, full[:, p - 1 + i]) for i, step in enumerate(gen.logits))
            torch.manual_seed(0)
            s1 = hf.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, budget=b)
            torch.manual_seed(0)
            s2 = hf.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, budget=b)
            r["sampling"] = bool(torch.equal(s1, s2)) and s1.shape[1] > p
            # left padding: a padded row generates what it generates alone
            row = prompt[1:, 2:]
            padded = torch.cat([torch.zeros_like(prompt[:1, :2]), row], dim=1)
            mask = torch.ones_like(padded)
            mask[:, :2] = 0
            both = torch.cat([prompt[:1], padded]), torch.cat([torch.ones_like(prompt[:1]), mask])
            got = hf.generate(both[0], attention_mask=both[1], max_new_tokens=5, do_sample=False, budget=b)
            alone = hf.generate(row, max_new_tokens=5, do_sample=False, budget=b)
            r["padding_equal"] = trim(got[1:, prompt.shape[1] :], eos) == trim(alone[:, row.shape[1] :], eos)
            res["per_budget"][str(b)] = r
        for call in (lambda: hf(ids, budget="nope"), lambda: hf.generate(prompt, max_new_tokens=2, budget="nope")):
            try:
                call()
                res.setdefault("unknown_budget", []).append(None)
            except ValueError as e:
                res.setdefault("unknown_budget", []).append(str(e))
    # without trust_remote_code: the plain family class, the full model
    plain = AutoModelForCausalLM.from_pretrained(d).eval()
    res["plain_class"] = type(plain).__module__ + "." + type(plain).__name__
    with torch.no_grad():
        res["plain_logits"] = max_diff(plain(ids, use_cache=False).logits, ref["logits"]["None"])
    # one budget as a standalone directory, loaded without remote code
    res["standalone"] = {}
    for b in hf.budgets:
        out_dir = Path(tempfile.mkdtemp()) / b
        try:
            hf.save_pretrained(out_dir, budget=b)
        except ValueError as e:
            res["standalone"][b] = {"error": str(e)}
            continue
        alone = AutoModelForCausalLM.from_pretrained(out_dir).eval()
        cfg = json.loads((out_dir / "config.json").read_text())
        with torch.no_grad():
            diff = max_diff(alone(ids, use_cache=False).logits, ref["logits"][b])
        res["standalone"][b] = {
            "logits": diff,
            "params": sum(p.numel() for p in alone.parameters()),
            "class": type(alone).__module__ + "." + type(alone).__name__,
            "custom": sorted(k for k in cfg if k.startswith("nestlm") or k == "auto_map"),
            "files": sorted(p.name for p in out_dir.iterdir()),
        }
    return res


def check_bf16(d, ref):
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    res = {"dtype": str(hf.model.embeddings.weight.dtype), "per_budget": {}}
    with torch.no_grad():
        for b in [None, *hf.budgets]:
            logits = hf(ref["ids"], budget=b).logits
            scale = float(ref["logits"][str(b)].float().abs().max())
            out = hf.generate(ref["prompt"], max_new_tokens=4, do_sample=False, budget=b)
            res["per_budget"][str(b)] = {"rel": max_diff(logits, ref["logits"][str(b)]) / scale, "new": out.shape[1]}
    return res


def run_snippet(d):
    """The model card's usage snippet, as a Hub user runs it (the directory path put in)."""
    card = (Path(d) / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = re.sub(r'path = ".*?"', f"path = {str(d)!r}", code)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    prompt = int(scope["inputs"]["input_ids"].shape[1])
    return {"prompt": prompt, "generated": int(scope["out"].shape[1]), "class": type(scope["model"]).__name__}


def main(spec_file, out_file):
    import time

    start = time.perf_counter()
    spec = json.loads(Path(spec_file).read_text())
    try:
        import nestlm  # noqa: F401

        importable = True
    except ImportError:
        importable = False
    out = {"nestlm_importable": importable, "families": {}, "bf16": {}, "snippet": {}}
    for name, item in spec["families"].items():
        out["families"][name] = check_family(item["dir"], torch.load(item["ref"]))
        out.setdefault("seconds", {})[name] = time.perf_counter() - start
    for name, item in spec.get("bf16", {}).items():
        out["bf16"][name] = check_bf16(item["dir"], torch.load(item["ref"]))
    for d in spec.get("snippet", []):
        out["snippet"][d] = run_snippet(d)
    out["nestlm_modules"] = sorted(
        m for m, v in sys.modules.items() if v is not None and (m == "nestlm" or m.startswith("nestlm."))
    )
    Path(out_file).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
