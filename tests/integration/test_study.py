"""The study (benchmarks/paper_in_small.py) in its --quick mode: every cell, verdict and token count holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark


def _study():
    return load_benchmark("paper_in_small")


def _check_verdict(c: dict) -> None:
    assert c["lo"] <= c["diff"] <= c["hi"]
    expected = "held" if c["lo"] > 0 else "not held" if c["hi"] < 0 else "inconclusive"
    assert c["verdict"] == expected, c
    assert c["better"] == {"held": "better", "not held": "worse"}.get(expected, "inconclusive"), c
    ni = "non-inferior" if c["lo"] > -0.03 else "inferior" if c["hi"] < -0.03 else "inconclusive"
    assert c["non_inferior"] == ni, c


def _check_cell(c: dict, n: int) -> None:
    assert c["n"] == n and 0.0 <= c["lo"] <= c["acc"] <= c["hi"] <= 1.0


@pytest.mark.slow
def test_quick_study_tables_verdicts_and_tokens(tmp_path: Path) -> None:
    study = _study()
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--quick"]) == 0
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0
    outcomes = json.loads((out / "outcomes.json").read_text())["models"]
    assert len(outcomes["parent"]["short"]) == 24 and all(isinstance(x, bool) for x in outcomes["elastic/50"]["short"])
    t = res["tables"]
    # claim 1: every budget has elastic and its comparison; small budgets have every method
    rows = {r["budget"]: r for r in t["claim1"]["rows"]}
    assert set(rows) == {"full", "75", "50"}
    for b, r in rows.items():
        _check_cell(r["elastic"], 24)
        _check_verdict(r["compare"])
        for meth in ("prune+KD", "one-shot pruned"):
            assert (r[meth] is None) == (b == "full")
            if r[meth] is not None:
                _check_cell(r[meth], 24)
        assert f"| {b} | {r['params']:,} |" in report
    # claim 1 at every difficulty (1-3) and length: small budgets vs prune+KD, the full budget vs the parent
    cells = t["claim1"]["cells"]
    sets = ("short:1", "long:1", "short:2", "short:3", "long:2", "long:3")
    assert sorted((c["budget"], c["set"]) for c in cells) == sorted((b, v) for b in ("full", "75", "50") for v in sets)
    for c in cells:
        n = 24 if c["set"] == "short:1" else 8
        _check_cell(c["elastic"], n)
        _check_cell(c["reference"], n)
        _check_verdict(c["compare"])
        assert c["vs"] == ("parent" if c["budget"] == "full" else "prune+KD")
    # claims 2 and 3: short and long for every budget, verdicts from their intervals
    for r in t["claim2"]["rows"]:
        for v in ("short", "long"):
            _check_cell(r[f"stage1/{v}"], 24 if v == "short" else 8)
            _check_cell(r[f"two-stage/{v}"], 24 if v == "short" else 8)
            _check_verdict(r[f"compare/{v}"])
    for r in t["claim3"]["rows"]:
        _check_cell(r["uniform"], 24)
        _check_verdict(r["compare"])
    # tokens: the family is one run; the per-size baseline spends as much for each size
    tok = t["claim1"]["tokens"]
    per = tok["prune+KD, per size"]
    assert tok["prune+KD, the two sizes"] == per["75"] + per["50"]
    assert per["75"] == per["50"] == tok["elastic family"]
    recipe = json.loads(json.dumps(__import__("yaml").safe_load((out / "seed0" / "elastic.yaml").read_text())))
    assert tok["elastic family"] == sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in recipe["stages"])
    logged = [json.loads(x) for x in (out / "seed0" / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in logged) == sum(s["steps"] for s in recipe["stages"])
    for sentence in ("Claim 1 ", "Claim 2 ", "Claim 3 "):
        assert sentence in report
    # --resume: every finished run and every score reused, the same tables
    assert study.main(["--out", str(out), "--quick", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["tables"] == t and again["wall_s"] < 60


def test_claim_1_alone_has_its_tables_and_no_others(tmp_path: Path) -> None:
    """`--claims 1` trains neither the stage-1-only nor the uniform run: the report holds claim 1 alone."""
    import random

    study = _study()
    rng = random.Random(0)

    def scored(p: float, sets=("short", "long", "short:2", "long:2")) -> dict:
        return {"params": 1000, "ppl": 1.1} | {s: [rng.random() < p for _ in range(40)] for s in sets}

    models = {"parent": scored(0.6)} | {f"elastic/{b}": scored(0.5) for b in study.BUDGETS}
    models |= {f"kd/{b}": scored(0.4) for b in study.SMALL} | {f"pruned/{b}": scored(0.0) for b in study.SMALL}
    tokens = {"elastic": 100} | {f"kd/{b}": 100 for b in study.SMALL}
    res = {"parent_params": 1000, "seeds": 1, "n_short": 40, "n_long": 40, "tokens": tokens, "models": models}
    res["wall_s"] = 1.0
    tables = study.build_tables(res)
    assert tables["claim2"]["rows"] == [] and tables["claim3"]["rows"] == []
    assert len(tables["claim1"]["cells"]) == 4 * len(study.BUDGETS)
    for c in tables["claim1"]["cells"]:
        _check_verdict(c["compare"])
    text = study.write_report(tmp_path, res, tables)
    assert "## Claim 1" in text and "Claim 2" not in text and "Claim 3" not in text
    with pytest.raises(SystemExit, match="--claims 2 must list claims among 1, 2, 3, claim 1 included"):
        study.main(["--out", str(tmp_path / "x"), "--claims", "2"])


@pytest.mark.slow
def test_seeds_run_apart_give_the_tables_of_one_invocation(tmp_path: Path) -> None:
    """`--only-seed K` (seeds in parallel, one process a core) trains and scores that seed alone and writes no
    report; `--resume --seeds 2` then trains nothing and reports both seeds, pairs side by side; `--kd-lr`
    trains the baseline at its own learning rate and the report says so."""
    study = _study()
    out = tmp_path / "apart"
    args = ["--out", str(out), "--quick", "--claims", "1", "--seeds", "2", "--kd-lr", "1e-4"]
    assert study.main([*args, "--only-seed", "0"]) == 0
    assert not (out / "results.json").exists() and (out / "seed0" / "elastic" / "config.json").is_file()
    assert not (out / "seed1").exists()
    assert study.main([*args, "--resume", "--only-seed", "1"]) == 0
    assert not (out / "results.json").exists() and (out / "seed1" / "elastic" / "config.json").is_file()
    assert study.main([*args, "--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["wall_s"] < 60  # every run and score reused
    yaml = __import__("yaml")
    kd = yaml.safe_load((out / "seed1" / "kd-75-lr0.0001.yaml").read_text())
    family = yaml.safe_load((out / "seed1" / "elastic.yaml").read_text())
    assert kd["train"]["lr"] == 1e-4 != family["train"]["lr"]
    per_seed = sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in family["stages"])
    assert res["tables"]["claim1"]["tokens"]["elastic family"] == per_seed  # per seed, not summed over seeds
    assert f"Learning rates: family {family['train']['lr']:g}, prune+KD 0.0001." in (out / "report.md").read_text()
    family["train"]["lr"] = 0.5  # as if an earlier invocation had trained it from another recipe
    (out / "seed1" / "elastic.yaml").write_text(yaml.safe_dump(family, sort_keys=False))
    for r in res["tables"]["claim1"]["rows"]:
        _check_cell(r["elastic"], 48)  # 24 problems x 2 seeds
        _check_verdict(r["compare"])
    with pytest.raises(SystemExit, match=r"elastic was trained from another recipe \(train.lr: 0.5 there, "):
        study.main([*args, "--resume"])  # a finished run is never reused for another recipe
    with pytest.raises(SystemExit, match=r"--only-seed 2 must be within 0\.\.1"):
        study.main([*args, "--resume", "--only-seed", "2"])
    # --family-lr: the family in its own directories beside the others; its baseline pruned to the new family's
    # parameter counts, reusing the pruned model and runs where pruning gives the same model
    assert study.main([*args, "--resume", "--only-seed", "0", "--family-lr", "2e-4"]) == 0
    fam = yaml.safe_load((out / "seed0" / "elastic-lr0.0002.yaml").read_text())
    assert fam["train"]["lr"] == 2e-4 and (out / "seed0" / "elastic-lr0.0002" / "config.json").is_file()
    grown = __import__("nestlm").load(out / "seed0" / "elastic-lr0.0002")
    for b in study.SMALL:
        n = grown.num_parameters(budget=b)
        same = (out / "seed0" / f"pruned-{b}-{n}" / "config.json").read_text() == (
            out / "seed0" / f"pruned-{b}" / "config.json"
        ).read_text()
        assert (out / "seed0" / f"kd-{b}-{n}-lr0.0001").exists() != same
