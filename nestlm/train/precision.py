"""The precision scheme of training: fp32 master weights and optimizer state, bf16 compute.

train.dtype:
  "float32"   everything in fp32.
  "bfloat16"  the student's weights, gradients and AdamW moments stay fp32 (master copy);
              the forward and backward run in bf16: under FSDP2 through its
              ``MixedPrecisionPolicy`` (parameters gathered in bf16, gradients reduced in
              fp32), in one process through ``torch.autocast``. The frozen teacher is stored
              in bf16 and runs without gradients.
  "auto"      bfloat16 on CUDA, float32 on CPU.
  "float16"   refused: fp16 needs loss scaling (a GradScaler), which nestlm does not do; bf16
              has fp32's range and needs none.
A parent stored in bf16 is upcast to fp32 master weights: in pure bf16 most updates at the
recipes' learning rates (~1e-5) round away (issue 12 measured ~85% of weights unchanged
after 10 AdamW steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import NestlmError


@dataclass(frozen=True)
class Precision:
    """Compute dtype of a run (None: fp32 throughout) and whether FSDP2 applies it."""

    compute: torch.dtype | None
    sharded: bool = False

    @property
    def teacher_dtype(self) -> torch.dtype:
        return self.compute or torch.float32

    def mp_policy(self) -> object | None:
        """FSDP2's MixedPrecisionPolicy (sharded runs with bf16 compute), else None."""
        if not self.sharded or self.compute is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """bf16 compute in one process (FSDP2's policy does it when sharded)."""
        if self.compute is None or self.sharded:
            yield
            return
        with torch.autocast(device.type, dtype=self.compute):
            yield


def resolve(dtype: str, device: torch.device, sharded: bool = False) -> Precision:
    """The Precision of ``train.dtype`` on ``device``; fp16 and unknown names are refused in one line."""
    if dtype == "float16":
        raise NestlmError(
            "train.dtype float16 is not supported: fp16 training needs loss scaling; use bfloat16 (fp32 master "
            "weights, bf16 compute) or float32"
        )
    if dtype not in ("auto", "float32", "bfloat16"):
        raise NestlmError(f"train.dtype {dtype!r} must be auto, float32 or bfloat16")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return Precision(torch.bfloat16 if dtype == "bfloat16" else None, sharded)


def master_weights(model: torch.nn.Module) -> torch.nn.Module:
    """The trainable model in fp32 (a bf16 parent is upcast exactly)."""
    return model.float()


def frozen(teacher: torch.nn.Module, p: Precision) -> torch.nn.Module:
    """The frozen teacher in the compute dtype, without gradients."""
    return teacher.to(p.teacher_dtype).eval().requires_grad_(False)
