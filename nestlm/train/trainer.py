"""The trainer: multi-budget distillation from the frozen parent, routers, two-stage curriculum.

``Trainer.run`` is the loop; everything else is a component it calls:
  elastic/training.py    budgets, the budget sampler, routers, the loss mix, freezing
  train/checkpointer.py  training checkpoints: save, restore, resume, retention
  train/schedules.py     LR per stage, Gumbel temperature and logit scale
  train/setup.py         the parent (loaded or initialised), automatic importance, data loaders
  checkpoint.py          the final elastic checkpoint (weights, config, importance, budgets,
                         routers, tokenizer files)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import io_error_line, save_into, save_pretrained, write_json
from ..elastic import training as el
from ..elastic.router import ElasticRouters
from ..errors import NestlmError
from ..model import HybridLM
from ..tokenizer import ByteTokenizer
from . import context_parallel, precision, preempt, rundir, setup
from .batching import stage_batching
from .checkpointer import METRICS, Checkpointer, TrainState, python_rng_from_json, python_rng_to_json
from .distributed import (
    all_reduce_sum,
    average_gradients,
    barrier,
    broadcast_parameters,
    full_state_dict,
    init_distributed,
    shard_model,
    shutdown,
)
from .losses import IGNORE, Head, ce_loss, kd_loss
from .recipe import Recipe, stage_probs, stage_steps
from .rundir import RUN_FILE
from .schedules import gumbel_schedule, set_lr
from .step import clip_gradients, forward_backward, micro_batches, on_device


class TrainingError(NestlmError):
    """The run cannot go on (NaN loss, a bad output directory, nothing to resume)."""


class Trainer:
    """Runs a Recipe into an output directory; ``run()`` returns the path of the elastic checkpoint."""

    def __init__(self, recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> None:
        self.recipe, self.out, self.progress = recipe, Path(out), progress
        tr, e = recipe.train, recipe.elastic
        if tr.threads:  # never more threads than the cores this process may run on (they would only wait)
            torch.set_num_threads(
                min(tr.threads, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tr.threads
            )
        self.device, self.dist = setup.device_and_dist(tr.device, init_distributed)
        self.mesh = context_parallel.make_mesh(tr.context_parallel, self.dist)  # (data, context) ranks
        self.precision = precision.resolve(tr.dtype, self.device, sharded=self.dist.enabled)
        self.batching = [stage_batching(s, tr, self.mesh.data.world) for s in recipe.stages]  # refused before any write
        self.elastic = tr.mode == "elastic"
        self.ckpt = Checkpointer(self.out, tr.keep_last, self.dist)
        if rundir.check_out_dir(self.out, recipe, resume, self.ckpt, TrainingError):  # a failed start: again
            barrier(self.dist)  # every rank has read the directory before the main rank clears it
            if self.dist.is_main:
                rundir.clear_failed_start(self.out)
        barrier(self.dist)
        torch.manual_seed(tr.seed)

        # ---- parent, tokenizer, data
        self.tokenizer = ByteTokenizer() if recipe.data.tokenizer == "bytes" else None
        self.model = setup.build_parent(recipe)
        if self.tokenizer is None:
            self.tokenizer = setup.model_tokenizer(self.model)
        self.data = setup.StageData(recipe, self.tokenizer, self.mesh.data)  # a bad source fails before any write
        self._save_parent = False
        if self.elastic:  # check the axes and targets before any slow or written work
            el.resolve_choices(self.model.config, e.axes, width_multiple=e.width_multiple)
            el.parse_budgets(e)
        if self.elastic and setup.needs_ranking(self.model, e):
            setup.auto_importance(self.model, recipe, self.data, self.progress and self.dist.is_main, self.device)
            self._save_parent = True  # written once every check has passed

        # ---- budgets, teacher, routers
        self.budget_names: list[str] = list(e.budgets) if self.elastic else ["full"]
        self.targets = el.parse_budgets(e) if self.elastic else {}
        order = self.model.importance.layer_order if self.model.importance else None
        if self.elastic:
            el.check_reachable(self.model.config, self.targets, e, order)
        self.full_budgets = {n for n, t in self.targets.items() if t.kind == "fraction" and t.value >= 1.0}
        self.routed = [n for n in self.budget_names if n not in self.full_budgets] if self.elastic else []
        self.routers: ElasticRouters | None = None
        self.fixed: dict[str, Any] = {}  # elastic.router: fixed: budget -> its one-shot ArchSpec, no routers
        if self.routed and e.router == "fixed":
            self.fixed, self.routed = el.fixed_archs(self.model.config, self.targets, self.routed, e), []
        if self.routed:
            self.routers = el.make_routers(self.model.config, e, len(self.routed), order)
            if e.router_init == "one-shot" and not resume:  # (a resumed run restores its routers)
                el.warm_start_routers(self.routers, self.model.config, self.targets, self.routed, e)
            elif e.router_init == "search" and not resume:  # on the same batches on every rank
                loader = self.data.loader(0, whole_batch=True)
                batches = [tuple(loader.next_batch()[:2]) for _ in range(e.importance_batches)]
                el.search_router_init(self.routers, self.model, batches, self.targets, self.routed, e)
            self.routers.to(self.device)
            broadcast_parameters(self.routers, self.dist)  # identical on every rank from step 0
        self.teacher: HybridLM | None = None
        if self.elastic and not e.trainable_teacher:
            self.teacher = precision.frozen(setup.frozen_teacher(self.model, recipe), self.precision)
        if not resume and self.dist.is_main:  # every check has passed: the run's directory starts here
            self.out.mkdir(parents=True, exist_ok=True)
            if self._save_parent:  # the ranked teacher, for comparisons
                save_pretrained(self.model, self.out / "parent", tokenizer=self._byte_tokenizer())
            run = {"fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict(), "cwd": os.getcwd()}
            write_json(self.out / RUN_FILE, run)  # cwd: what a relative model.path was relative to
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        precision.master_weights(self.model).to(self.device).train()
        self.model.gradient_checkpointing = tr.activation_checkpointing
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.dist.enabled:
            shard_model(self.model, self.precision.mp_policy())
            if self.teacher is not None:
                shard_model(self.teacher)
        if tr.compile:  # after sharding (FSDP2 wraps the blocks that are compiled), before any forward
            setup.compile_models(self.model, self.teacher)
        self.opt = setup.optimizer(self.model, self.routers, recipe)
        self.total_steps = sum(stage_steps(s, tr) for s in recipe.stages)
        self.state = TrainState(budget_rng=None)
        self.sampler = el.BudgetSampler(self.budget_names, tr.seed)
        self.gumbel = torch.Generator().manual_seed(tr.seed + 1)
        self.loader: Any = None
        self.tb = None
        if resume:
            self.state = self.ckpt.restore(self.model, self.routers, self.opt, self.gumbel)
            if self.state.budget_rng is not None:
                self.sampler.rng.setstate(python_rng_from_json(self.state.budget_rng))
        barrier(self.dist)

    # ------------------------------------------------------------------ set-up
    def _byte_tokenizer(self) -> ByteTokenizer | None:
        return self.tokenizer if isinstance(self.tokenizer, ByteTokenizer) else None

    def save_checkpoint(self) -> None:
        """Every rank writes its shards of the model, routers and optimizer (nothing is gathered)."""
        self.state.data = self.loader.state_dict() if self.loader is not None else {}
        self.state.budget_rng = python_rng_to_json(self.sampler.rng.getstate())
        self.ckpt.save(self.model, self.routers, self.opt, self.gumbel, self.state)

    def _forward(self, model: HybridLM, x: torch.Tensor, **kw: Any) -> torch.Tensor | Head:
        """Logits, or with train.kd_chunk_tokens a Head (hidden states + weight) for the chunked losses."""
        chunk = self.recipe.train.kd_chunk_tokens
        with self.precision.autocast(self.device):
            out = model(x, head=not chunk, context=self.mesh.context, **kw)
        return Head(out.hidden_states, model.output_weight(), chunk, self.precision.compute) if chunk else out.logits

    # ---------------------------------------------------------------- one step
    def train_step(self, stage_idx: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        rec, e = self.recipe, self.recipe.elastic
        stage = rec.stages[stage_idx]
        budget = self.sampler.draw(stage_probs(rec, stage)) if self.elastic else "full"
        tau, scale = gumbel_schedule(self.state.global_step, self.total_steps, tuple(e.tau), tuple(e.logit_scale))
        arch, sample = self.fixed.get(budget), None
        if budget in self.routed:
            sample = self.routers.sample(self.routed.index(budget), tau, scale, generator=self.gumbel)
            if e.mask == "hard":
                arch = self.routers.arch(sample.choice)
        kd, bl_val, cost_val = forward_backward(self, budget, sample, arch, batches)
        if self.routers is not None:
            average_gradients(self.routers, self.dist)
        if not math.isfinite(kd) or not math.isfinite(bl_val):
            raise TrainingError(
                f"loss became {kd} at step {self.state.global_step} (stage {stage.name!r}, budget {budget!r}); "
                f"stopped without saving. Last good checkpoint: {self.ckpt.latest() or 'none'}. Lower train.lr or "
                "check the data"
            )
        norms = clip_gradients(self.opt, rec.train.grad_clip, rec.train.router_grad_clip, self.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        out: dict[str, Any] = {"budget": budget, "loss": kd, "ce": kd}  # plain training: the loss is the CE
        if self.elastic:
            out = {"budget": budget, "loss": kd + e.budget_loss_weight * bl_val, "kd": kd, "budget_loss": bl_val}
            out |= {"tau": tau, "scale": scale}
        if cost_val is not None:
            out["expected_cost"] = cost_val
        if arch is not None:
            out["params"] = arch.num_parameters(self.model.config)
        return out | norms

    @torch.no_grad()
    def validate(self, stage_idx: int) -> dict[str, float]:
        """Validation loss per budget (KD to the teacher for elastic runs, CE for plain runs)."""
        self.model.eval()
        out = {}
        batches = self.loader.val_batches(self.recipe.train.eval_batches)
        for budget in self.budget_names if batches else []:
            arch = self.fixed.get(budget)
            if budget in self.routed:  # unconstrained argmax: validation watches what the routers prefer now
                arch = self.routers.freeze(self.routed.index(budget), scale=self.recipe.elastic.logit_scale[1])
            total = torch.zeros(2, device=self.device)  # (sum of token-weighted losses, tokens) on the device
            for mb in (m for b in batches for m in micro_batches(b, self.batching[stage_idx].micro_batch)):
                x, y, kw = on_device(mb, self.device)  # kw: the segment ids of packed rows
                logits = self._forward(self.model, x, arch=arch, **kw)
                if self.elastic:
                    t_logits = self._forward(self.teacher or self.model, x, **kw)
                    loss = kd_loss(logits, t_logits, self.recipe.elastic.kd_temperature, y)
                else:
                    loss = ce_loss(logits, y)
                n = (y != IGNORE).sum()
                total += torch.stack([loss.detach().float() * n, n.float()])
            total = all_reduce_sum(total, self.dist)
            out[budget] = float(total[0] / total[1].clamp_min(1))
        self.model.train()
        return out

    # ------------------------------------------------------------------- the run
    def _log(self, rec: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(rec) + "\n")
            setup.tensorboard_log(self.tb, rec)

    def run(self) -> Path:
        from tqdm.auto import tqdm

        from ..progress import show_progress

        rec = self.recipe
        self.tb = setup.open_tensorboard(rec.train.tensorboard and self.dist.is_main, self.out)
        guard = preempt.PreemptGuard()
        try:
            guard.__enter__()
            for si in range(self.state.stage, len(rec.stages)):
                stage = rec.stages[si]
                steps, shape = stage_steps(stage, rec.train), self.batching[si]
                self.loader = self.mesh.loader(self.data.loader(si))  # this rank's part of every sequence
                start = self.state.stage_step if si == self.state.stage else 0
                if start and self.state.data:
                    self.loader.load_state_dict(self.state.data)
                bar = tqdm(
                    total=steps,
                    initial=start,
                    desc=f"stage {si + 1}/{len(rec.stages)} {stage.name}",
                    disable=not (show_progress(self.progress) and self.dist.is_main),
                    dynamic_ncols=True,
                )
                ema: dict[str, float] = {}
                for step in range(start, steps):
                    set_lr(self.opt, stage, rec.train.lr, step, steps)
                    t0 = time.perf_counter()
                    batches = micro_batches(self.loader.next_batch(), shape.micro_batch)  # this rank's share
                    m = self.train_step(si, batches)
                    dt = time.perf_counter() - t0
                    ntok = shape.tokens(stage.seq_len)  # the global batch's, exact for any world size
                    self.state.global_step += 1
                    self.state.stage_step, self.state.stage = step + 1, si
                    m |= {"step": self.state.global_step, "stage": stage.name, "lr": self.opt.param_groups[0]["lr"]}
                    m["tokens"], m["tokens_per_s"] = ntok, ntok / dt
                    self.state.history.append({"step": m["step"], "budget": m["budget"], "loss": m["loss"]})
                    self._log(m)
                    v = m.get("kd", m["loss"])
                    ema[m["budget"]] = v if m["budget"] not in ema else 0.8 * ema[m["budget"]] + 0.2 * v
                    bar.set_postfix(setup.progress_fields(ema, ntok / dt, m))
                    bar.update(1)
                    if rec.train.eval_every and self.state.global_step % rec.train.eval_every == 0:
                        self._log({"step": self.state.global_step, "stage": stage.name, "val": self.validate(si)})
                    last = step == steps - 1
                    every = rec.train.checkpoint_every
                    stop = guard.agreed(self.dist, self.device)  # every rank stops after the same step
                    if last or stop or (every and self.state.global_step % every == 0):
                        if last:  # the next stage starts from its beginning
                            self.state.stage, self.state.stage_step = si + 1, 0
                        self.save_checkpoint()
                    if stop:
                        raise guard.stopped(self.ckpt.latest(), self.dist)
                bar.close()
                self._log({"step": self.state.global_step, "stage": stage.name, "val": self.validate(si)})
                self.state.stage, self.state.stage_step = si + 1, 0
            return self.finish()
        except (preempt.Preempted, TrainingError):
            raise
        except (OSError, NestlmError) as e:  # disk full, read-only, bad data met mid-run: one line naming what is safe
            msg = io_error_line(e) if isinstance(e, OSError) else str(e)
            raise TrainingError(f"{msg}; last good checkpoint: {self.ckpt.latest() or 'none'}") from None
        finally:
            guard.__exit__()
            if self.tb is not None:
                self.tb.close()

    def frozen_budgets(self) -> dict[str, Any]:
        cfg, e = self.model.config, self.recipe.elastic
        names, targets = self.budget_names, self.targets
        return el.freeze_budgets(cfg, names, targets, self.routed, self.routers, e, self.elastic, self.fixed)

    def finish(self) -> Path:
        """Freeze budgets and write the elastic checkpoint into --out (through the checkpoint owner)."""
        sd = full_state_dict(self.model, self.dist)
        budgets = self.frozen_budgets() if self.elastic else {}  # on every rank: no rank-0-only compute
        if not self.dist.is_main:
            barrier(self.dist)
            return self.out
        with torch.device("meta"):  # a plain (unsharded) model holding the trained weights
            final = HybridLM(self.model.config)
        final.load_state_dict({k: v.cpu() for k, v in sd.items()}, assign=True)
        final.importance = self.model.importance
        final.source_dir = self.model.source_dir
        if self.recipe.data.chat_template:  # the template the data was rendered with: served as trained
            final.chat_template = self.data.chat.template("data.chat_template")
        final.elastic = budgets
        routers = self.routers.state_dict() if self.routers is not None else None
        save_into(final, self.out, routers=routers, tokenizer=self._byte_tokenizer())
        barrier(self.dist)
        return self.out


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run a recipe; returns the output directory (an elastic checkpoint when train.mode is elastic)."""
    trainer = Trainer(recipe, out, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.dist)
