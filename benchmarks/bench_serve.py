"""`nestlm serve` under load: throughput and latency per concurrency, against transformers, memory, auto.

One run builds an elastic checkpoint of about 20M parameters (random weights, byte vocabulary,
no EOS so that every request emits exactly --max-tokens tokens; budgets full / 75 / 50 are the
homogeneous ArchSpecs ``closest_homogeneous`` picks for 1.0, 0.75 and 0.5 of the parameters),
starts ``nestlm serve`` on it in a subprocess on 127.0.0.1 (loopback only) and drives it with
httpx (streaming completions, prompts as token ids, temperature 0). Everything is bounded:
each load phase runs for --seconds and at most --max-requests requests per client.

Tables:

1. concurrency: 1, 4 and 16 clients, each client cycling over the budgets (mixed budgets in
   flight): aggregate output tokens/s, p50/p99 time to first token (TTFT), p50/p99 time per
   output token after the first (TPOT). Goal: 16 clients >= 3x the tokens/s of 1 client.
2. against transformers: per budget, the same prompts through ``generate`` of
   ``AutoModelForCausalLM`` on the budget's sliced Hugging Face export (``export_hf``), one
   request at a time, against one request at a time through the server at that budget
   (whole request time). Goal: the server is not slower (ratio nestlm / HF <= 1).
3. memory: bytes of the distinct tensor storages alive in a process that has served every
   budget through the scheduler (every tensor the garbage collector sees, so a per-budget copy
   anywhere would count), against the sum of the sliced models' weights (one server per
   budget); beside it the resident memory (VmRSS) of the elastic server subprocess and of one
   server subprocess per sliced budget. Goal: one server's storage <= 1.02x the full weights.
4. ``model: "auto"`` under a load step (1 client for --seconds / 3, then 16 for 2 x --seconds): p99 TPOT and the
   budgets that
   answered, against the same load pinned to the full budget. The latency target is
   --target-factor times the 1-client full-budget TPOT of table 1. Goal: auto's p99 TPOT
   under the step is below the pinned server's.

    .venv/bin/python benchmarks/bench_serve.py            # about 20M parameters, a few minutes
    .venv/bin/python benchmarks/bench_serve.py --quick    # tiny model, short phases (a smoke run)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import nestlm
from nestlm.checkpoint import Budget
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, closest_homogeneous, parse_target

BUDGETS = (("full", 1.0), ("75", 0.75), ("50", 0.5))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pattern", default="M-M*-M-M*-M-", help="layer pattern (M Mamba2, * attention, - MLP)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each load phase")
    p.add_argument("--max-requests", type=int, default=40, help="at most this many requests per client per phase")
    p.add_argument("--hf-requests", type=int, default=4, help="requests per budget in the transformers comparison")
    p.add_argument("--target-factor", type=float, default=2.0, help="auto's latency target / 1-client full TPOT")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of the server and of transformers (1: see the README)"
    )
    p.add_argument("--sections", default="1,2,3,4", help="which tables to run (4 needs 1 for its target)")
    p.add_argument("--quick", action="store_true", help="hidden 128, 6 layers, 4 s phases")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.pattern, a.seconds, a.max_tokens, a.hf_requests = 128, "M-M*-M", 4.0, 16, 2
    return a


# ---------------------------------------------------------------- the model
def build_checkpoint(args: argparse.Namespace, root: Path) -> Path:
    d = args.hidden
    cfg = ModelConfig.from_pattern(
        args.pattern,
        vocab_size=259,
        hidden_size=d,
        mamba_heads=2 * d // 64,
        mamba_head_dim=64,
        mamba_groups=2,
        d_state=64,
        attn_heads=d // 64,
        kv_heads=max(1, d // 128),
        attn_head_dim=64,
        ffn=4 * d,
        mamba_chunk_size=64,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = nestlm.HybridLM(cfg).eval()
    model.reset_parameters(seed=0)
    model.elastic = {}
    total = ArchSpec.full(cfg).num_parameters(cfg)
    for name, f in BUDGETS:
        spec = ArchSpec.full(cfg) if f == 1.0 else closest_homogeneous(cfg, parse_target(str(f)))
        n = spec.num_parameters(cfg)
        model.elastic[name] = Budget(name=name, target=str(name), arch=spec, params=n, fraction=n / total)
    out = root / "elastic"
    model.save_pretrained(str(out))
    (out / "nestlm_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    return out


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """``nestlm serve`` in a subprocess on loopback."""

    def __init__(self, model_dir: Path, threads: int, *extra: str) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "nestlm", "serve", "--model", str(model_dir), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("nestlm serve exited: " + self.proc.stderr.read()[-2000:])
            if time.time() - t0 > 300:
                raise RuntimeError("nestlm serve did not start in 300 s")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()["scheduler"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------- load
def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, length), generator=g).tolist()


def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """A streaming completion; times of the first and last text chunk, tokens, the answering model."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    tokens, answered = 0, None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            answered = obj.get("model", answered)
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if obj.get("choices") and obj["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    first, last = first or end, last or end
    return {
        "ttft": first - t0,
        "tpot": (last - first) / (tokens - 1) if tokens > 1 else 0.0,
        "total": end - t0,
        "tokens": tokens,
        "model": answered,
        "start": t0,
    }


def run_load(
    url: str, clients: int, models: list[str], seconds: float, max_requests: int, args, seed: int = 0, delay: float = 0
) -> tuple[list[dict], float]:
    """``clients`` threads, each sending requests back to back for ``seconds``; client i cycles over ``models``."""
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    t_start = time.perf_counter() + delay

    def client(i: int) -> None:
        ps = prompts(max_requests, args.prompt_tokens, seed + i)
        with httpx.Client(timeout=300) as c:
            while time.perf_counter() < t_start:
                time.sleep(0.001)
            for k in range(max_requests):
                if time.perf_counter() - t_start > seconds:
                    break
                r = one_request(c, url, models[(i + k) % len(models)], ps[k], args.max_tokens)
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t_start


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ----------------------------------------------------------------- sections
def concurrency_table(srv: ServerProc, args) -> dict[int, dict]:
    print("\n## 1. Concurrency (mixed budgets: each client cycles full, 75, 50)\n")
    print(
        f"prompt {args.prompt_tokens} tokens, {args.max_tokens} output tokens per request, "
        f"{args.seconds:.0f} s per row\n"
    )
    print(
        "| clients | requests | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
        "| mean rows per decode step |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    names = [b for b, _ in BUDGETS]
    for n in (1, 4, 16):
        before = srv.health()
        res, wall = run_load(srv.url, n, names, args.seconds, args.max_requests, args, seed=100 * n)
        after = srv.health()
        steps = after["decode_steps"] - before["decode_steps"]
        mean_rows = (after["decode_rows"] - before["decode_rows"]) / max(steps, 1)
        tps = sum(r["tokens"] for r in res) / wall
        ttft = [1000 * r["ttft"] for r in res]
        tpot = [1000 * r["tpot"] for r in res]
        rows[n] = {"tps": tps, "tpot_p50": pct(tpot, 50), "res": res}
        print(
            f"| {n} | {len(res)} | {tps:.0f} | {pct(ttft, 50):.0f} | {pct(ttft, 99):.0f} | {pct(tpot, 50):.1f} | "
            f"{pct(tpot, 99):.1f} | {mean_rows:.2f} |"
        )
    ratio = rows[16]["tps"] / rows[1]["tps"]
    print(
        f"\n16 clients / 1 client aggregate tokens/s: {ratio:.2f}x  "
        f"(goal >= 3x: {mark(ratio >= 3)}; floor 2x: {mark(ratio >= 2)})"
    )
    return rows


def hf_table(srv: ServerProc, model_dir: Path, root: Path, args) -> None:
    import httpx
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "falling back to the PyTorch implementation" per layer
    hf_logging.disable_progress_bar()

    print("\n## 2. Against transformers generate on the sliced HF export, one request at a time\n")
    print("| budget | params | HF generate s/request | nestlm serve s/request | nestlm / HF | goal <= 1 |")
    print("|---|---:|---:|---:|---:|---|")
    model = nestlm.load(model_dir)
    ps = prompts(args.hf_requests, args.prompt_tokens, seed=7)
    torch.set_num_threads(args.threads)
    for name, _ in BUDGETS:
        d = root / f"hf-{name}"
        nestlm.export_hf(model.slice(name), d)
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        times = []
        with torch.inference_mode():
            hf.generate(torch.tensor([ps[0]]), max_new_tokens=2, do_sample=False)  # warm-up
            for p in ps:
                t0 = time.perf_counter()
                hf.generate(
                    torch.tensor([p]),
                    max_new_tokens=args.max_tokens,
                    min_new_tokens=args.max_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                times.append(time.perf_counter() - t0)
        del hf
        ours = []
        with httpx.Client(timeout=300) as c:
            one_request(c, srv.url, name, ps[0], 2)  # warm-up
            for p in ps:
                ours.append(one_request(c, srv.url, name, p, args.max_tokens)["total"])
        h, o = statistics.median(times), statistics.median(ours)
        print(
            f"| {name} | {model.num_parameters(budget=name) / 1e6:.1f}M | {h:.3f} | {o:.3f} | {o / h:.2f} "
            f"| {mark(o <= h)} |"
        )


def storage_bytes() -> int:
    """Bytes of the distinct storages of every tensor alive in this process."""
    import warnings

    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch module attributes warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                    st = obj.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
            except Exception:
                continue
    return sum(seen.values())


def memory_table(srv: ServerProc, model_dir: Path, root: Path, args) -> None:
    from nestlm.serve.scheduler import Request, Scheduler

    print("\n## 3. Memory: one server for every budget vs one server per sliced budget\n")
    base = storage_bytes()
    model = nestlm.load(model_dir).eval()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sched = Scheduler(model)
    done: list[tuple] = []
    for name, _ in BUDGETS:
        sched.submit(Request(prompt=[5] * 16, budget=name, max_tokens=4, sink=done.append))
    while sum(e[0] == "done" for e in done) < len(BUDGETS):
        sched.step()
    one = storage_bytes() - base
    sliced = {name: model.slice(name) for name, _ in BUDGETS}
    per_budget = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in sliced.items()}
    del sliced, sched
    gc.collect()
    # resident memory: the elastic server (after table 1 it has served every budget) and one server per slice
    rss_one = srv.rss_bytes()
    rss_each = {}
    for name, _ in BUDGETS:
        d = root / f"slice-{name}"
        model.slice(name).save_pretrained(str(d))
        (d / "nestlm_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    procs = {name: ServerProc(root / f"slice-{name}", args.threads) for name, _ in BUDGETS}
    try:
        import httpx

        for name, p in procs.items():
            httpx.post(
                p.url + "/v1/completions",
                json={"model": f"slice-{name}", "prompt": [5] * 16, "max_tokens": 4},
                timeout=300,
            ).raise_for_status()
            rss_each[name] = p.rss_bytes()
    finally:
        for p in procs.values():
            p.close()
    mb = 1 / 2**20
    print("| | weight storage MiB | x full weights | resident MiB |")
    print("|---|---:|---:|---:|")
    print(f"| full model's weights | {full_bytes * mb:.1f} | 1.00 | |")
    print(f"| one server, every budget served | {one * mb:.1f} | {one / full_bytes:.3f} | {rss_one * mb:.0f} |")
    for name in per_budget:
        print(
            f"| server of slice {name} | {per_budget[name] * mb:.1f} | {per_budget[name] / full_bytes:.3f} "
            f"| {rss_each[name] * mb:.0f} |"
        )
    tot = sum(per_budget.values())
    print(
        f"| one server per budget (sum) | {tot * mb:.1f} | {tot / full_bytes:.3f} | {sum(rss_each.values()) * mb:.0f} |"
    )
    print(
        f"\none server's weight storage / full weights: {one / full_bytes:.3f} "
        f"(goal <= 1.02: {mark(one / full_bytes <= 1.02)}); "
        f"one server per budget needs {tot / one:.2f}x the storage of one server"
    )


def auto_table(model_dir: Path, base_tpot_ms: float, args) -> None:
    target = args.target_factor * base_tpot_ms
    print(f'\n## 4. model "auto" under a load step (1 client, then 16), target {target:.1f} ms per token\n')
    print(f"--target-latency-ms {target:.1f} = {args.target_factor} x the 1-client full-budget TPOT p50 of table 1")
    print("| requests | clients | p50 TPOT ms | p99 TPOT ms | tokens/s | budgets that answered |")
    print("|---|---:|---:|---:|---:|---|")
    p99 = {}
    srv = ServerProc(model_dir, args.threads, "--target-latency-ms", f"{target:.3f}")
    try:
        for label in ("auto", "full"):
            res1, _ = run_load(srv.url, 1, [label], args.seconds / 3, args.max_requests, args, seed=5)
            res16, wall = run_load(srv.url, 16, [label], 2 * args.seconds, args.max_requests, args, seed=6)
            for n, res, w in ((1, res1, None), (16, res16, wall)):
                tp = [1000 * r["tpot"] for r in res]
                counts: dict[str, int] = {}
                for r in res:
                    counts[r["model"]] = counts.get(r["model"], 0) + 1
                tps = f"{sum(r['tokens'] for r in res) / w:.0f}" if w else ""
                chosen = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                print(f"| {label} | {n} | {pct(tp, 50):.1f} | {pct(tp, 99):.1f} | {tps} | {chosen} |")
                if n == 16:
                    p99[label] = pct(tp, 99)
            time.sleep(3)  # let auto's latency window empty before the next load step
    finally:
        srv.close()
    ok = p99["auto"] < p99["full"]
    print(f"\nunder 16 clients, p99 TPOT auto {p99['auto']:.1f} ms vs pinned full {p99['full']:.1f} ms ({mark(ok)})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_checkpoint(args, root)
        m = nestlm.load(model_dir)
        sizes = ", ".join(f"{b} {m.num_parameters(budget=b) / 1e6:.1f}M" for b, _ in BUDGETS)
        print(f"# bench_serve: {m.config.pattern} hidden {args.hidden}, budgets {sizes}; torch {torch.__version__}")
        print(f"server: nestlm serve on 127.0.0.1, {args.threads} torch threads; load: httpx threads in this process")
        del m
        sections = {int(x) for x in args.sections.split(",")}
        srv = ServerProc(model_dir, args.threads)
        try:
            rows = concurrency_table(srv, args) if sections & {1, 4} else None
            if 2 in sections:
                hf_table(srv, model_dir, root, args)
            if 3 in sections:
                memory_table(srv, model_dir, root, args)
        finally:
            srv.close()
        if 4 in sections:
            full_tpot = [1000 * r["tpot"] for r in rows[1]["res"] if r["model"] == "full"]
            auto_table(model_dir, pct(full_tpot, 50), args)


if __name__ == "__main__":
    main()
