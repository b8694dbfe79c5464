"""nestlm vs transformers (NemotronH, NemotronH MoE with --model nemotron_h_moe, or Llama with --model
llama): training-step and decode throughput.

Builds a NemotronH model with transformers from a NemotronHConfig (or, with ``--model
llama``, a Transformer: LlamaForCausalLM from a LlamaConfig with ``--layers`` layers of
GQA attention + SwiGLU MLP), saves it to a temporary directory and loads the same weights
with ``nestlm.load``. Then, in one run,
on the same data:

* checks that both models agree (max |logits difference| on the training batch, and
  that greedy generation yields the same tokens), so a speedup never comes from a
  wrong answer;
* times a training step (forward + cross-entropy loss + backward; no optimizer);
* times cached greedy decoding (``generate``), prefill included, at batch 1 and 4;

each for nestlm eager and for nestlm with every block compiled (``nestlm.compile_model``,
torch.compile's inductor backend; ``--no-compile`` skips it), and prints a table of tokens/s
and the ratios nestlm / transformers, eager and compiled. Compilation happens in the parity
checks and the warm-up repetitions, so the timed ones measure compiled code only.

With ``--model nemotron_h_moe`` (pattern ``--moe-pattern``, routed experts, top-k, expert and
shared widths from their flags) it also times the MoE layer alone (forward + backward; eager
nestlm only, as ``compile_model`` compiles whole blocks), and every MoE row twice: against
transformers' default experts implementation (named in the row; ``grouped_mm`` in transformers 5)
and against ``eager`` (its per-expert loop), switched with ``set_experts_implementation``. Every
timing is the median over ``--steps`` repetitions (nestlm and HF interleaved) after ``--warmup``
untimed ones, with ``torch.set_num_threads(--threads)``.

    .venv/bin/python benchmarks/bench_model.py            # default CPU-sized config
    .venv/bin/python benchmarks/bench_model.py --quick    # a smaller config, seconds
    .venv/bin/python benchmarks/bench_model.py --model llama --quick
    .venv/bin/python benchmarks/bench_model.py --model nemotron_h_moe --quick
    .venv/bin/python benchmarks/bench_model.py --no-compile   # eager nestlm only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import nestlm

PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["nemotron_h", "nemotron_h_moe", "llama"],
        default="nemotron_h",
        help="the transformers class",
    )
    p.add_argument("--layers", type=int, default=4, help="Transformer layers (--model llama; --pattern otherwise)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pattern", default="M-M*-M-M-", help="layer pattern: M mamba, * attention, - MLP")
    p.add_argument("--mamba-heads", type=int, default=16)
    p.add_argument("--mamba-head-dim", type=int, default=64)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--attn-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--moe-pattern", default="ME*EME", help="layer pattern of --model nemotron_h_moe (E: MoE)")
    p.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=4, help="experts per token")
    p.add_argument("--expert-ffn", type=int, default=256, help="width of each routed expert")
    p.add_argument("--shared-ffn", type=int, default=512, help="width of the shared expert")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--seq", type=int, default=512, help="training sequence length")
    p.add_argument("--batch", type=int, default=2, help="training batch size")
    p.add_argument("--prompt", type=int, default=32, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode run")
    p.add_argument("--decode-batches", default="1,4", help="comma-separated decode batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small config and few repetitions (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd nestlm column")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.vocab = min(args.hidden, 256), min(args.ffn, 768), min(args.vocab, 2048)
        args.mamba_heads, args.d_state = min(args.mamba_heads, 8), min(args.d_state, 32)
        args.seq, args.chunk, args.new_tokens = min(args.seq, 256), min(args.chunk, 64), min(args.new_tokens, 16)
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    return args


def build_hf(args: argparse.Namespace):
    import transformers

    if args.model == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
            num_attention_heads=args.attn_heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(4096, args.seq + args.prompt + args.new_tokens),
            tie_word_embeddings=False,
            use_cache=True,
            eos_token_id=None,
            bos_token_id=None,
        )
        torch.manual_seed(args.seed)
        hf = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # norms at 1 would hide a wrong mapping
            for name, prm in hf.named_parameters():
                if name.endswith("norm.weight"):
                    prm.copy_(1 + 0.2 * torch.randn(prm.shape))
        return hf
    moe = args.model == "nemotron_h_moe"
    kinds = [PATTERN[c] for c in (args.moe_pattern if moe else args.pattern)]
    extra = {}
    if moe:
        extra = dict(
            n_routed_experts=args.experts,
            num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.expert_ffn,
            moe_shared_expert_intermediate_size=args.shared_ffn,
            routed_scaling_factor=2.5,
        )
    cfg = transformers.NemotronHConfig(
        **extra,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers_block_type=kinds,
        num_attention_heads=args.attn_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.attn_heads,
        intermediate_size=args.ffn,
        mamba_num_heads=args.mamba_heads,
        mamba_head_dim=args.mamba_head_dim,
        n_groups=args.groups,
        ssm_state_size=args.d_state,
        chunk_size=args.chunk,
        tie_word_embeddings=False,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    hf = transformers.NemotronHForCausalLM(cfg)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so parity means something
        for name, prm in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                prm.copy_(1 + 0.2 * torch.randn(prm.shape))
            elif name.endswith(".D") or name.endswith("dt_bias") or name.endswith("conv1d.bias"):
                prm.copy_(torch.randn(prm.shape) * 0.5)
            elif name.endswith("gate.weight"):  # separated router scores: a real choice of experts
                prm.mul_(20)
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    return hf


Row = tuple[str, float, float, float | None]  # name, HF tok/s, nestlm tok/s, compiled nestlm tok/s (or None)


def moe_layer_rows(args: argparse.Namespace, hf, ours, experts_impl: str) -> list[Row]:
    """The first MoE layer alone, forward + backward, on normed-size random input (B x seq tokens).
    Eager nestlm only: ``compile_model`` compiles whole blocks, not a mixer on its own."""
    i = next(j for j, ls in enumerate(ours.config.layers) if ls.kind == "moe")
    a, b = hf.model.layers[i].mixer, ours.layers[i].mixer
    gen = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=gen)
    g = torch.randn(args.batch, args.seq, args.hidden, generator=gen)
    with torch.no_grad():
        diff = (a(x) - b(x)).abs().max().item()
    print(f"parity: MoE layer {i} max |nestlm - HF ({experts_impl})| = {diff:.2e}")

    def step(m) -> Callable[[], None]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_(True)
            (m(xx) * g).sum().backward()

        return run

    t_hf, t_ours = median_times([step(a), step(b)], args.steps, args.warmup)
    ntok = args.batch * args.seq
    return [
        (f"MoE layer fwd+bwd (B={args.batch}, L={args.seq}) vs HF {experts_impl}", ntok / t_hf, ntok / t_ours, None)
    ]


def median_times(fns: list[Callable[[], object]], steps: int, warmup: int) -> list[float]:
    """Median seconds per call of each function. Repetitions are interleaved (a, b, a, b, ...)
    so that a load change on the machine affects every function alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf = build_hf(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = nestlm.load(tmp)
    hf.eval()
    ours.eval()
    comp = None if args.no_compile else nestlm.compile_model(copy.deepcopy(ours))
    n_params = sum(p.numel() for p in ours.parameters())

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    prompts = {b: torch.randint(3, args.vocab, (b, args.prompt), generator=gen) for b in batches}

    if args.model == "nemotron_h_moe":
        print(
            f"config: NemotronH MoE, hidden {args.hidden}, pattern {args.moe_pattern!r}, {args.experts} routed experts "
            f"x {args.expert_ffn} (top {args.top_k}), shared expert {args.shared_ffn}, mamba {args.mamba_heads}x"
            f"{args.mamba_head_dim}, attention {args.attn_heads}/{args.kv_heads}, vocab {args.vocab}; "
            f"{n_params / 1e6:.1f}M parameters"
        )
    elif args.model == "llama":
        print(
            f"config: Llama, hidden {args.hidden}, {args.layers} layers, attention {args.attn_heads}/{args.kv_heads} "
            f"heads, SwiGLU ffn {args.ffn}, vocab {args.vocab}; {n_params / 1e6:.1f}M parameters"
        )
    else:
        print(
            f"config: hidden {args.hidden}, pattern {args.pattern!r}, mamba {args.mamba_heads}x{args.mamba_head_dim} "
            f"(groups {args.groups}, d_state {args.d_state}, chunk {args.chunk}), attention {args.attn_heads}/"
            f"{args.kv_heads} heads, ffn {args.ffn}, vocab {args.vocab}; {n_params / 1e6:.1f}M parameters"
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; train batch {args.batch} x seq {args.seq}; "
        f"decode prompt {args.prompt} + {args.new_tokens} new tokens; median of {args.steps} after {args.warmup} warmup"
    )

    # ---- correctness: same logits, same greedy tokens
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        got = ours(ids).logits
    logit_diff = (ref - got).abs().max().item()
    print(f"parity: max |logits nestlm - HF| = {logit_diff:.2e} (batch {args.batch} x seq {args.seq})")

    def hf_generate(p: torch.Tensor) -> torch.Tensor:
        n = args.new_tokens
        with torch.no_grad():
            return hf.generate(p, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def our_generate(p: torch.Tensor) -> torch.Tensor:
        # no EOS stop, as min_new_tokens does for HF: both produce exactly new_tokens tokens
        return ours.generate(p, max_new_tokens=args.new_tokens, eos_token_id=[])

    for b, p in prompts.items():
        a, c = hf_generate(p), our_generate(p)
        same = a.shape == c.shape and bool((a == c).all())
        print(f"parity: greedy generate batch {b}: {'identical tokens' if same else 'TOKENS DIFFER'}")

    def comp_generate(p: torch.Tensor) -> torch.Tensor:
        return comp.generate(p, max_new_tokens=args.new_tokens, eos_token_id=[])

    if comp is not None:
        t0 = time.perf_counter()
        with torch.no_grad():
            got_c = comp(ids).logits
        print(
            f"parity: max |logits compiled - eager nestlm| = {(got_c - got).abs().max().item():.2e} "
            f"(first call, compilation included: {time.perf_counter() - t0:.1f} s)"
        )
        for b, p in prompts.items():
            t0 = time.perf_counter()
            same = bool((comp_generate(p) == our_generate(p)).all())
            print(
                f"parity: compiled greedy generate batch {b}: {'identical tokens' if same else 'TOKENS DIFFER'} "
                f"(first call: {time.perf_counter() - t0:.1f} s)"
            )

    # ---- training step: forward + CE loss + backward
    def hf_train() -> None:
        hf.zero_grad(set_to_none=True)
        ce_loss(hf(input_ids=ids, use_cache=False).logits, ids).backward()

    def our_train() -> None:
        ours.zero_grad(set_to_none=True)
        ce_loss(ours(ids).logits, ids).backward()

    def comp_train() -> None:
        comp.zero_grad(set_to_none=True)
        ce_loss(comp(ids).logits, ids).backward()

    def timed_row(name: str, ntok: int, fns: list[Callable[[], object]]) -> Row:
        """Tokens/s of HF, eager nestlm and (when compiled) compiled nestlm: medians, interleaved."""
        ts = median_times(fns if comp is not None else fns[:2], args.steps, args.warmup)
        return name, ntok / ts[0], ntok / ts[1], ntok / ts[2] if comp is not None else None

    models = [hf, ours] + ([comp] if comp is not None else [])
    rows: list[Row] = []
    # MoE: every row against transformers' default experts implementation, then against eager
    impls = [hf.config._experts_implementation, "eager"] if args.model == "nemotron_h_moe" else [None]
    for impl in impls:
        tag = ""
        if impl is not None:
            hf.set_experts_implementation(impl)
            tag = f" vs HF {impl}"
            rows += moe_layer_rows(args, hf, ours, impl)

        for m in models:
            m.train()
        name = f"train step (B={args.batch}, L={args.seq}, fwd+bwd){tag}"
        rows.append(timed_row(name, args.batch * args.seq, [hf_train, our_train, comp_train]))
        for m in models:
            m.eval()
            m.zero_grad(set_to_none=True)

        # ---- cached greedy decode
        for b, p in prompts.items():
            name = f"greedy decode (B={b}, {args.prompt}+{args.new_tokens}){tag}"
            fns = [lambda p=p: hf_generate(p), lambda p=p: our_generate(p), lambda p=p: comp_generate(p)]
            rows.append(timed_row(name, b * args.new_tokens, fns))

    print_table(rows, compiled=comp is not None)


def print_table(rows: list[Row], compiled: bool) -> None:
    cols = ["HF tok/s", "nestlm tok/s", "compiled tok/s", "nestlm/HF", "compiled/HF"]
    if not compiled:
        cols = [c for c in cols if not c.startswith("compiled")]
    w = max(len(r[0]) for r in rows)
    print()
    print(" | ".join([f"{'benchmark':<{w}}"] + cols))
    print("-|-".join(["-" * w] + ["-" * len(c) for c in cols]))
    for name, hf_tps, our_tps, comp_tps in rows:
        c_tps, c_ratio = ("-", "-") if comp_tps is None else (f"{comp_tps:.1f}", f"{comp_tps / hf_tps:.2f}x")
        vals = [f"{hf_tps:.1f}", f"{our_tps:.1f}"] + ([c_tps] if compiled else [])
        vals += [f"{our_tps / hf_tps:.2f}x"] + ([c_ratio] if compiled else [])
        print(" | ".join([f"{name:<{w}}"] + [f"{v:>{len(c)}}" for v, c in zip(vals, cols, strict=True)]))


if __name__ == "__main__":
    main()
