"""Per-budget evaluation: held-out perplexity and reasoning accuracy (exact match, greedy)."""

from __future__ import annotations

from typing import Any

import torch

from ..tasks import reasoning
from ..tokenizer import ByteTokenizer, Tokenizer
from .perplexity import solution_perplexity


def reasoning_tokens(tok: Tokenizer, n: int, variant: str = "short") -> torch.Tensor:
    """Held-out problems (test seeds) as one token stream, documents joined by EOS."""
    ids: list[int] = []
    for p in reasoning.test_problems(n, variant):
        ids.extend(tok.encode(p.text))
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def max_new_tokens_for(variant: str, difficulty: int = 1) -> int:
    """A generation cap that every reference solution of the variant and difficulty fits."""
    return (160 + 96 * difficulty) if variant == "short" else (512 + 384 * difficulty)


@torch.no_grad()
def reasoning_outcomes(
    model: Any,
    tok: Tokenizer,
    problems: list[reasoning.Problem],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    budget: str | None = None,
    progress: bool = False,
) -> tuple[list[bool], list[str]]:
    """Greedy-decode each problem's solution; (correct per problem, generations)."""
    from tqdm.auto import tqdm

    from ..progress import show_progress

    gens: list[str] = []
    pad = getattr(tok, "pad_token_id", 0) or 0
    # shorter prompts first: rows of a batch then need less left padding and finish together
    order = sorted(range(len(problems)), key=lambda i: len(problems[i].prompt))
    by_index: dict[int, str] = {}
    for i in tqdm(range(0, len(order), batch_size), desc="reasoning", disable=not show_progress(progress), leave=False):
        idx = order[i : i + batch_size]
        batch = [problems[j] for j in idx]
        cap = max_new_tokens or max(max_new_tokens_for(p.variant, p.difficulty) for p in batch)
        enc = [tok.encode(p.prompt) for p in batch]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for r, e in enumerate(enc):  # left padding, as transformers takes it
            ids[r, L - len(e) :] = torch.tensor(e)
            mask[r, L - len(e) :] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=cap, budget=budget)
        for j, row in zip(idx, out, strict=True):
            by_index[j] = tok.decode(row[L:].tolist())
    gens = [by_index[j] for j in range(len(problems))]
    correct = [reasoning.extract_answer(g) == p.answer for p, g in zip(problems, gens, strict=True)]
    return correct, gens


def reasoning_accuracy(
    model: Any,
    tok: Tokenizer,
    n: int = 64,
    variant: str = "short",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    budget: str | None = None,
    progress: bool = False,
    difficulty: int = 1,
) -> dict[str, Any]:
    """Greedy-decode the solution of ``n`` held-out problems; exact match of the final answer,
    with its 95% (Wilson) interval and the outcome of every problem (for paired comparisons)."""
    from .stats import wilson_interval

    problems = reasoning.test_problems(n, variant, difficulty)
    correct, gens = reasoning_outcomes(model, tok, problems, batch_size, max_new_tokens, budget, progress)
    acc = sum(correct) / n if n else 0.0
    return {
        "accuracy": acc,
        "n": n,
        "ci95": wilson_interval(sum(correct), n),
        "correct": correct,
        "examples": [(problems[i].prompt, gens[i]) for i in range(min(3, n))],
    }


def evaluate_models(
    models: list[dict[str, Any]],
    total_params: int | None = None,
    quick: bool = False,
    progress: bool = True,
    n_ppl_problems: int = 200,
    n_reasoning: int = 200,
) -> list[dict[str, Any]]:
    """Rows (name, kind, params, fraction, loss, ppl, accuracy with its 95% Wilson interval) for standalone
    model directories; every model is scored on the same ``n_reasoning`` held-out problems."""
    from ..loading import load

    tok = ByteTokenizer()
    ppl_problems = reasoning.test_problems(150 if quick else n_ppl_problems, "short", 1)
    rows = []
    for m in models:
        model = load(m["path"]).eval()
        n = sum(p.numel() for p in model.parameters())
        ppl = solution_perplexity(model, tok, ppl_problems)  # per byte of the solution, given the question
        acc = reasoning_accuracy(model, tok, n=16 if quick else n_reasoning, batch_size=48, progress=progress)
        row = {
            "name": m["name"],
            "kind": m["kind"],
            "params": n,
            "fraction": n / total_params if total_params else None,
            "loss": ppl["loss"],
            "ppl": ppl["ppl"],
            "accuracy": acc["accuracy"],
            "accuracy_ci": list(acc["ci95"]),
            "accuracy_n": acc["n"],
            "correct": acc["correct"],
            "path": m["path"],
        }
        if "budget" in m:
            row["budget"] = m["budget"]
        rows.append(row)
        if progress:
            lo, hi = acc["ci95"]
            print(
                f"  {m['name']:>14}: {n:,} params, ppl {ppl['ppl']:.3f}, "
                f"reasoning {acc['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] (n={acc['n']})",
                flush=True,
            )
    return rows
