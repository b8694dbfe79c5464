"""The elastic trainer: multi-budget distillation from the frozen parent, routers, curriculum.

One optimizer step = one budget, drawn with the stage's probabilities from a seeded
generator (the same on every rank). The full budget runs the whole model with no
masks; any other budget samples its routers (Gumbel-Softmax) and, in hard mode, runs
its sub-network *sliced*. Loss = KL(teacher || student) + lambda * budget loss.
Checkpoints (safetensors + JSON, atomic) hold everything a resume needs: model,
routers, optimizer, RNG states, data position, stage and step. The run ends by
freezing each budget's argmax choices into an ArchSpec and writing an elastic
checkpoint into the output directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_dir, load, save_pretrained, write_json
from ..config import ModelConfig
from ..elastic.arch import ArchSpec, Target, count_parameters, parse_target
from ..elastic.importance import estimate_importance, reorder
from ..elastic.router import ElasticRouters, gumbel_schedule, resolve_choices
from ..errors import NestlmError
from ..model import HybridLM
from ..tokenizer import ByteTokenizer, load_tokenizer
from . import data as data_mod
from .distributed import (
    DistInfo,
    all_reduce_mean,
    average_gradients,
    barrier,
    full_state_dict,
    init_distributed,
    shard_model,
    shutdown,
)
from .losses import ce_loss, kd_loss
from .recipe import Recipe, stage_probs, stage_steps

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(NestlmError):
    """The run cannot go on (NaN loss, a bad output directory, nothing to resume)."""


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint."""

    global_step: int = 0
    stage: int = 0
    stage_step: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    budget_rng: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step losses (for exact-resume checks)


def _python_rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _python_rng_from_json(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


class Trainer:
    """Runs a Recipe into an output directory; ``run()`` returns the path of the elastic checkpoint."""

    def __init__(self, recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> None:
        self.recipe = recipe
        self.out = Path(out)
        self.progress = progress
        tr = recipe.train
        if tr.threads:
            torch.set_num_threads(tr.threads)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if tr.device == "auto" else tr.device
        )
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.autocast = None
        if tr.dtype == "auto":
            self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        elif tr.dtype != "float32":
            self.autocast = DTYPES[tr.dtype]
        self.elastic = tr.mode == "elastic"
        self._check_out_dir(resume)
        torch.manual_seed(tr.seed)

        # ---- parent, tokenizer, data
        self.tokenizer = ByteTokenizer() if recipe.data.tokenizer == "bytes" else None
        self.model = self._build_parent()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model.source_dir)
        self.stage_tokens: dict[str, torch.Tensor] = {}
        if recipe.data.packing == "stream":  # read the data now: a bad source fails before anything is written
            self.stage_tokens[recipe.data.train] = self._load_tokens(recipe.data.train)
        else:
            data_mod.load_documents(
                recipe.data.train,
                self.tokenizer,
                recipe.data.max_bytes,
                1,
                recipe.data.seed,
                completion_only=recipe.data.loss == "completion",
            )
        self._save_parent = False
        if self.elastic:  # check the axes and targets before any slow or written work
            resolve_choices(self.model.config, recipe.elastic.axes)
            for t in recipe.elastic.budgets.values():
                parse_target(t)
        only_full = all(
            (t := parse_target(v)).kind == "fraction" and t.value >= 1.0 for v in recipe.elastic.budgets.values()
        )  # plain KD of one model (e.g. a pruned student): nothing is nested, no ranking is needed
        unranked = self.model.importance is None or not self.model.importance.reordered
        if self.elastic and unranked and not only_full:
            if not recipe.elastic.auto_importance:
                from ..elastic.importance import require_reordered

                require_reordered(self.model, "elastic training")
            self._auto_importance()

        # ---- budgets, teacher, routers
        self.budget_names: list[str] = list(recipe.elastic.budgets) if self.elastic else ["full"]
        self.targets: dict[str, Target] = {}
        if self.elastic:
            for name, t in recipe.elastic.budgets.items():
                self.targets[name] = parse_target(t)
            self._check_reachable()
        self.full_budgets = {n for n, t in self.targets.items() if t.kind == "fraction" and t.value >= 1.0}
        self.routed = [n for n in self.budget_names if n not in self.full_budgets] if self.elastic else []
        self.routers: ElasticRouters | None = None
        if self.routed:
            choices = resolve_choices(self.model.config, recipe.elastic.axes)
            self.routers = ElasticRouters(
                self.model.config,
                choices,
                n_budgets=len(self.routed),
                layer_order=self.model.importance.layer_order if self.model.importance else None,
                d_router=recipe.elastic.d_router,
                heterogeneous=recipe.elastic.heterogeneous,
            ).to(self.device)
        self.teacher: HybridLM | None = None
        if self.elastic and recipe.model.teacher is not None:
            self.teacher = load(recipe.model.teacher).eval().requires_grad_(False)
            if self.teacher.config.vocab_size != self.model.config.vocab_size:
                raise NestlmError(
                    f"model.teacher {recipe.model.teacher} has vocabulary {self.teacher.config.vocab_size}, "
                    f"the student {self.model.config.vocab_size}; distillation needs the same vocabulary"
                )
        elif self.elastic and not recipe.elastic.trainable_teacher:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if not resume and self.dist.is_main:  # every check has passed: the run's directory starts here
            self.out.mkdir(parents=True, exist_ok=True)
            if self._save_parent:  # the ranked teacher, for comparisons
                save_pretrained(self.model, self.out / "parent")
            write_json(self.out / RUN_FILE, {"fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict()})
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        self.model.to(self.device).train()
        self.model.gradient_checkpointing = tr.activation_checkpointing
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.dist.enabled:
            shard_model(self.model)
            if self.teacher is not None:
                shard_model(self.teacher)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": tr.lr, "base_lr": tr.lr}]
        if self.routers is not None:
            rlr = tr.lr * recipe.elastic.router_lr_mult
            groups.append(
                {
                    "params": list(self.routers.parameters()),
                    "lr": rlr,
                    "base_lr": rlr,
                    "weight_decay": 0.0,
                    "eps": recipe.elastic.router_eps,
                }
            )
        self.opt = torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)
        self.total_steps = sum(stage_steps(s, 1) for s in recipe.stages)
        self.state = TrainState(budget_rng=None)
        self.budget_rng = random.Random(tr.seed)
        self.gumbel = torch.Generator().manual_seed(tr.seed + 1)
        self.loader: Any = None
        self.tb = None
        if resume:
            self._restore()
        barrier(self.dist)

    # ------------------------------------------------------------------ set-up
    def _check_out_dir(self, resume: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out {out} is a file; give a directory")
        run = out / RUN_FILE
        if resume:
            if not run.is_file():
                raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); drop --resume to start")
            fp = json.loads(run.read_text()).get("fingerprint")
            if fp != self.recipe.fingerprint():
                raise TrainingError(
                    f"--out {out} holds a different run (recipe fingerprint {fp} != {self.recipe.fingerprint()}); "
                    "resume with the same recipe and overrides, or choose a new --out"
                )
            if self._latest_checkpoint() is None:
                raise TrainingError(f"--resume: {out} has no complete checkpoint yet; start again without --resume")
        elif out.is_dir() and any(out.iterdir()):
            what = "a different run" if run.is_file() else "files"
            raise TrainingError(
                f"--out {out} already holds {what}; pass --resume to continue it, or choose a new --out"
            )

    def _build_parent(self) -> HybridLM:
        r = self.recipe
        if r.model.path is not None:
            return load(r.model.path)
        init = dict(r.model.init or {})
        pattern = init.pop("pattern", None)
        if pattern is None:
            raise NestlmError("model.init needs a 'pattern' (e.g. 'M-M*-M-') plus vocab_size and hidden_size")
        if r.data.tokenizer == "bytes":
            init.setdefault("vocab_size", ByteTokenizer.vocab_size)
            init.setdefault("eos_token_id", ByteTokenizer.eos_token_id)
            init.setdefault("pad_token_id", ByteTokenizer.pad_token_id)
        try:
            cfg = ModelConfig.from_pattern(pattern, **init)
        except TypeError as e:
            raise NestlmError(f"model.init: {e}") from None
        model = HybridLM(cfg)
        model.reset_parameters(seed=r.model.seed)
        return model

    def _load_tokens(self, source: str) -> torch.Tensor:
        d = self.recipe.data
        return data_mod.load_tokens(
            source, self.tokenizer, max_bytes=d.max_bytes, num_problems=d.num_problems, seed=d.seed
        )

    def _loader(self, stage_idx: int, whole_batch: bool = False) -> Any:
        stage = self.recipe.stages[stage_idx]
        d = self.recipe.data
        src = stage.data or d.train
        if d.packing == "rows":  # whole documents per row (see train/data.py)
            docs = data_mod.load_documents(
                src, self.tokenizer, d.max_bytes, d.num_problems, d.seed, completion_only=d.loss == "completion"
            )
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            packed: Any = data_mod.PackedRows(docs, stage.seq_len, d.val_fraction, src, pad_id=pad)
        else:
            if src not in self.stage_tokens:
                self.stage_tokens[src] = self._load_tokens(src)
            packed = self.stage_tokens[src]
        return data_mod.BlockLoader(
            packed,
            seq_len=stage.seq_len,
            batch_size=stage.batch_size,
            seed=self.recipe.data.seed + stage_idx,
            val_fraction=self.recipe.data.val_fraction,
            rank=0 if whole_batch else self.dist.rank,
            world=1 if whole_batch else self.dist.world,
            name=src,
        )

    def _auto_importance(self) -> None:
        e = self.recipe.elastic
        loader = self._loader(0, whole_batch=True)  # every rank ranks on the same data
        batches = [loader.next_batch()[0] for _ in range(e.importance_batches)]
        imp = estimate_importance(self.model, batches, progress=self.progress and self.dist.is_main)
        reorder(self.model, imp)
        self._save_parent = True  # written once every check has passed

    def _check_reachable(self) -> None:
        cfg = self.model.config
        total = count_parameters(cfg)
        for name, t in self.targets.items():
            if t.kind == "memory":
                continue
            p = t.params(cfg)
            if p > total * 1.0001:
                raise NestlmError(f"budget {name!r} asks for {p:.4g} parameters; the parent has only {total:.4g}")
            choices = resolve_choices(cfg, self.recipe.elastic.axes) if self.elastic else {}
            smallest = ArchSpec.full(cfg)
            if choices:
                routers = ElasticRouters(
                    cfg,
                    choices,
                    1,
                    layer_order=self.model.importance.layer_order if self.model.importance else None,
                )
                idx = {a: torch.tensor([len(v) - 1]) for a, v in choices.items()}
                smallest = routers.arch(idx)
            low = smallest.num_parameters(cfg)
            if p < low * (1 - self.recipe.elastic.tolerance):
                raise NestlmError(
                    f"budget {name!r} ({t}) = {p:.4g} parameters is below the smallest choice the axes allow "
                    f"({low:.4g}); add smaller choices to elastic.axes or raise the budget"
                )

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / CHECKPOINTS

    def _latest_checkpoint(self) -> Path | None:
        d = self._ckpt_dir()
        if not d.is_dir():
            return None
        steps = sorted(
            p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()
        )
        return steps[-1] if steps else None

    def save_checkpoint(self) -> None:
        model_sd = full_state_dict(self.model, self.dist)
        opt_sd = self._optimizer_state()
        if not self.dist.is_main:
            return
        path = self._ckpt_dir() / f"step-{self.state.global_step:08d}"
        self._ckpt_dir().mkdir(parents=True, exist_ok=True)
        with atomic_dir(path, overwrite=True) as tmp:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            if self.routers is not None:
                save_file(
                    {k: v.contiguous() for k, v in self.routers.state_dict().items()}, str(tmp / "routers.safetensors")
                )
            tensors, meta = opt_sd
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            rng = {"torch": torch.get_rng_state(), "gumbel": self.gumbel.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            self.state.data = self.loader.state_dict() if self.loader is not None else {}
            self.state.budget_rng = _python_rng_to_json(self.budget_rng.getstate())
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "state.json", self.state.__dict__)  # written last: marks a complete checkpoint
        kept = sorted(p for p in self._ckpt_dir().iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in kept[: -self.recipe.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _all_modules(self) -> torch.nn.Module:
        """Model and routers under one root, so that every optimized parameter has a name."""
        mods = {"model": self.model}
        if self.routers is not None:
            mods["routers"] = self.routers
        return torch.nn.ModuleDict(mods)

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            sd = get_optimizer_state_dict(
                self._all_modules(), self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            sd = self.opt.state_dict()
        if not self.dist.is_main:  # full state dicts land on rank 0 only
            return {}, {}
        tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
        for pid, st in sd["state"].items():
            meta["state_keys"][str(pid)] = list(st)
            for k, v in st.items():
                tensors[f"{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        return tensors, meta

    def _restore(self) -> None:
        path = self._latest_checkpoint()
        assert path is not None
        for p in self._ckpt_dir().iterdir():  # leftovers of a write that was killed
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        if self.routers is not None:
            self.routers.load_state_dict(load_file(str(path / "routers.safetensors")))
        meta = json.loads((path / "optimizer.json").read_text())
        flat = load_file(str(path / "optimizer.safetensors"))
        state = {}
        for pid, keys in meta["state_keys"].items():
            key = int(pid) if pid.isdigit() else pid
            state[key] = {k: flat[f"{pid}.{k}"] for k in keys}
        sd = {"state": state, "param_groups": meta["param_groups"]}
        if self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self._all_modules(), self.opt, sd, options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(sd)
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        self.gumbel.set_state(rng["gumbel"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        st = json.loads((path / "state.json").read_text())
        self.state = TrainState(**st)
        if st.get("budget_rng") is not None:
            self.budget_rng.setstate(_python_rng_from_json(st["budget_rng"]))
        self._resumed_from = path
        metrics = self.out / METRICS
        if self.dist.is_main and metrics.is_file():  # drop lines logged after the checkpoint we resume from
            keep = [
                ln for ln in metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= self.state.global_step
            ]
            tmp = metrics.with_name(".metrics.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, metrics)

    # ---------------------------------------------------------------- one step
    def _lr_factor(self, stage_idx: int, step: int, steps: int) -> float:
        s = self.recipe.stages[stage_idx]
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        t = (step - s.warmup_steps) / max(1, steps - s.warmup_steps)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def _memory_kw(self) -> dict[str, Any]:
        m = self.recipe.elastic.memory
        return {"dtype": DTYPES[m.dtype], "batch": m.batch, "context": m.context}

    def _forward(self, model: HybridLM, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                return model(x, **kw).logits
        return model(x, **kw).logits

    def train_step(self, stage_idx: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        rec = self.recipe
        stage = rec.stages[stage_idx]
        if self.elastic:
            probs = stage_probs(rec, stage)
            budget = self.budget_rng.choices(self.budget_names, weights=probs, k=1)[0]
        else:
            budget = "full"
        tau, scale = gumbel_schedule(
            self.state.global_step, self.total_steps, tuple(rec.elastic.tau), tuple(rec.elastic.logit_scale)
        )
        kd_sum = torch.zeros((), device=self.device)
        bl_val, cost_val, arch = 0.0, None, None
        sample = None
        if budget in self.routed:
            sample = self.routers.sample(self.routed.index(budget), tau, scale, generator=self.gumbel)
            if rec.elastic.mask == "hard":
                arch = self.routers.arch(sample.choice)
        n_micro = len(batches)
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            if not self.elastic:
                loss = ce_loss(self._forward(self.model, x), y)
                kd_sum = kd_sum + loss.detach()
                (loss / n_micro).backward()
                continue
            with torch.no_grad():
                teacher = self.teacher if self.teacher is not None else self.model
                t_logits = self._forward(teacher, x)
            if sample is None:  # the full budget: no masks
                s_logits = self._forward(self.model, x)
                loss = kd_loss(s_logits, t_logits, rec.elastic.kd_temperature, y)
                if rec.elastic.trainable_teacher:
                    loss = loss + ce_loss(s_logits, y)
            else:
                if rec.elastic.mask == "hard":
                    s_logits = self._forward(self.model, x, arch=arch, gates=self.routers.hard_gates(sample))
                else:
                    s_logits = self._forward(
                        self.model, x, probe=self.routers.soft_probe(sample), gates=self.routers.soft_gates(sample)
                    )
                loss = kd_loss(s_logits, t_logits, rec.elastic.kd_temperature, y)
            kd_sum = kd_sum + loss.detach()
            # the router's (tiny) graph is shared by every micro-batch and the budget loss
            (loss / n_micro).backward(retain_graph=sample is not None)
        if sample is not None:
            e = rec.elastic
            bl, cost = self.routers.budget_loss(sample, self.targets[budget], e.tolerance, **self._memory_kw())
            (e.budget_loss_weight * bl).backward()
            bl_val, cost_val = float(bl.detach()), float(cost.detach())
        if self.routers is not None:
            average_gradients(self.routers, self.dist)
        kd = float(all_reduce_mean(kd_sum / n_micro, self.dist))
        if not math.isfinite(kd) or not math.isfinite(bl_val):
            last = self._latest_checkpoint()
            raise TrainingError(
                f"loss became {kd} at step {self.state.global_step} (stage {stage.name!r}, budget {budget!r}); "
                f"stopped without saving. Last good checkpoint: {last or 'none'}. Lower train.lr or check the data"
            )
        gnorm = self._clip_gradients(self.recipe.train.grad_clip) if self.recipe.train.grad_clip else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not self.elastic:  # plain training: the loss is the cross entropy
            out: dict[str, Any] = {"budget": budget, "loss": kd, "ce": kd}
        else:
            out = {
                "budget": budget,
                "loss": kd + rec.elastic.budget_loss_weight * bl_val,
                "kd": kd,
                "budget_loss": bl_val,
                "tau": tau,
                "scale": scale,
            }
        if cost_val is not None:
            out["expected_cost"] = cost_val
        if arch is not None:
            out["params"] = arch.num_parameters(self.model.config)
        if gnorm is not None:
            out["grad_norm"] = float(gnorm)
        return out

    def _clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip by the global norm over the model (FSDP2 DTensors when sharded) and the routers together."""
        total = torch.zeros((), device=self.device)
        groups = []
        for g in self.opt.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            n = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(n, "full_tensor"):  # a DTensor under FSDP2
                n = n.full_tensor()
            total = total + n.float().pow(2)
            groups.append(params)
        total = total.sqrt()
        for params in groups:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @torch.no_grad()
    def validate(self, stage_idx: int) -> dict[str, float]:
        """Validation loss per budget (KD to the teacher for elastic runs, CE for plain runs)."""
        self.model.eval()
        out = {}
        batches = self.loader.val_batches(self.recipe.train.eval_batches)
        if not batches:
            self.model.train()
            return out
        for budget in self.budget_names:
            arch = None
            if budget in self.routed:
                arch = self.routers.freeze(self.routed.index(budget), scale=self.recipe.elastic.logit_scale[1])
                # (unconstrained argmax here: validation watches what the routers currently prefer)
            total = 0.0
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                logits = self._forward(self.model, x, arch=arch)
                if self.elastic:
                    total += float(
                        kd_loss(
                            logits, self._forward(self.teacher or self.model, x), self.recipe.elastic.kd_temperature, y
                        )
                    )
                else:
                    total += float(ce_loss(logits, y))
            out[budget] = float(all_reduce_mean(torch.tensor(total / len(batches)), self.dist))
        self.model.train()
        return out

    # ------------------------------------------------------------------- the run
    def _log(self, rec: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tag = f"{k}/{rec['budget']}" if k in ("loss", "kd", "budget_loss") and "budget" in rec else k
                    self.tb.add_scalar(tag, v, rec["step"])

    def _open_tensorboard(self) -> None:
        if not (self.recipe.train.tensorboard and self.dist.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is an optional extra; metrics.jsonl always has everything
            return
        self.tb = SummaryWriter(str(self.out / "tb"))

    def run(self) -> Path:
        from tqdm.auto import tqdm

        rec = self.recipe
        self._open_tensorboard()
        try:
            for si in range(self.state.stage, len(rec.stages)):
                stage = rec.stages[si]
                steps = stage_steps(stage, 1)
                self.loader = self._loader(si)
                if si == self.state.stage and self.state.stage_step and self.state.data:
                    self.loader.load_state_dict(self.state.data)
                bar = tqdm(
                    total=steps,
                    initial=self.state.stage_step if si == self.state.stage else 0,
                    desc=f"stage {si + 1}/{len(rec.stages)} {stage.name}",
                    disable=not (self.progress and self.dist.is_main),
                    dynamic_ncols=True,
                )
                ema: dict[str, float] = {}
                start = self.state.stage_step if si == self.state.stage else 0
                for step in range(start, steps):
                    f = self._lr_factor(si, step, steps)
                    for g in self.opt.param_groups:
                        base = g["base_lr"] if stage.lr is None else g["base_lr"] * stage.lr / rec.train.lr
                        g["lr"] = base * f
                    t0 = time.perf_counter()
                    batches = [self.loader.next_batch() for _ in range(rec.train.grad_accum)]
                    m = self.train_step(si, batches)
                    dt = time.perf_counter() - t0
                    ntok = sum(x.numel() for x, _ in batches) * self.dist.world
                    self.state.global_step += 1
                    self.state.stage_step = step + 1
                    self.state.stage = si
                    m.update(
                        step=self.state.global_step,
                        stage=stage.name,
                        lr=self.opt.param_groups[0]["lr"],
                        tokens_per_s=ntok / dt,
                    )
                    self.state.history.append({"step": m["step"], "budget": m["budget"], "loss": m["loss"]})
                    self._log(m)
                    v = m.get("kd", m["loss"])
                    ema[m["budget"]] = v if m["budget"] not in ema else 0.8 * ema[m["budget"]] + 0.2 * v
                    bar.set_postfix(
                        {
                            **{f"{k}": f"{v:.3f}" for k, v in ema.items()},
                            "tok/s": f"{ntok / dt:.0f}",
                            **({"tau": f"{m['tau']:.2f}"} if "tau" in m else {}),
                        }
                    )
                    bar.update(1)
                    if rec.train.eval_every and self.state.global_step % rec.train.eval_every == 0:
                        self._log({"step": self.state.global_step, "stage": stage.name, "val": self.validate(si)})
                    last = step == steps - 1
                    if last or (
                        rec.train.checkpoint_every and self.state.global_step % rec.train.checkpoint_every == 0
                    ):
                        if last:  # the next stage starts from its beginning
                            self.state.stage, self.state.stage_step = si + 1, 0
                        self.save_checkpoint()
                bar.close()
                val = self.validate(si)
                self._log({"step": self.state.global_step, "stage": stage.name, "val": val})
                self.state.stage, self.state.stage_step = si + 1, 0
            return self.finish()
        finally:
            if self.tb is not None:
                self.tb.close()

    def frozen_budgets(self) -> dict[str, dict[str, Any]]:
        cfg = self.model.config
        total = count_parameters(cfg)
        out = {}
        for name in self.budget_names:
            t = self.targets.get(name, Target("fraction", 1.0))
            e = self.recipe.elastic
            if name in self.routed:
                spec = self.routers.freeze(
                    self.routed.index(name), t, e.tolerance, scale=e.logit_scale[1], **self._memory_kw()
                )
            else:
                spec = ArchSpec.full(cfg)
            n = spec.num_parameters(cfg)
            e = self.recipe.elastic.memory
            out[name] = {
                "target": str(self.recipe.elastic.budgets.get(name, 1.0)) if self.elastic else "1.0",
                "target_description": str(t),
                "arch": spec,
                "params": n,
                "fraction": n / total,
                "memory_bytes": spec.memory_bytes(cfg, DTYPES[e.dtype], e.batch, e.context),
            }
        return out

    def finish(self) -> Path:
        """Freeze budgets and write the elastic checkpoint (files renamed into --out, config.json last)."""
        sd = full_state_dict(self.model, self.dist)
        if not self.dist.is_main:
            barrier(self.dist)
            return self.out
        with torch.device("meta"):  # a plain (unsharded) model holding the trained weights
            final = HybridLM(self.model.config)
        final.load_state_dict({k: v.cpu() for k, v in sd.items()}, assign=True)
        final.importance = self.model.importance
        final.source_dir = self.model.source_dir
        final.elastic = self.frozen_budgets() if self.elastic else {}
        tmp = self.out / ".final-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(final, tmp)
        if self.routers is not None:
            save_file(
                {k: v.contiguous() for k, v in self.routers.state_dict().items()}, str(tmp / "routers.safetensors")
            )
        if self.recipe.data.tokenizer == "bytes":
            write_json(tmp / "nestlm_tokenizer.json", {"type": "bytes"})
        names = sorted(p.name for p in tmp.iterdir())
        names.remove("config.json")
        for n in names + ["config.json"]:  # config.json last: a reader sees a complete model or none
            os.replace(tmp / n, self.out / n)
        shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.dist)
        return self.out


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run a recipe; returns the output directory (an elastic checkpoint when train.mode is elastic)."""
    trainer = Trainer(recipe, out, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.dist)
