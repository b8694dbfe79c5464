"""The collective helper refuses a tensor its backend cannot take, before any process blocks."""

from __future__ import annotations

import pytest
import torch

from nestlm.train.distributed import (
    CollectiveDeviceError,
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    average_gradients,
    backend_for,
    broadcast_parameters,
    check_device,
)

NCCL = DistInfo(rank=0, world=2, backend="nccl")  # a process group that is never joined: the check runs first


def test_cpu_tensor_to_nccl_raises() -> None:
    t = torch.ones(3)
    for call in (lambda: all_reduce_sum(t, NCCL), lambda: all_reduce_mean(t, NCCL)):
        with pytest.raises(CollectiveDeviceError, match="cpu tensor cannot go through the 'nccl'"):
            call()
    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.ones_like(lin.weight)
    with pytest.raises(CollectiveDeviceError):
        average_gradients(lin, NCCL)
    with pytest.raises(CollectiveDeviceError):
        broadcast_parameters(lin, NCCL)


def test_backend_table() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert backend_for("gloo", cpu) == "gloo" and backend_for("nccl", cuda) == "nccl"
    assert backend_for("nccl", cpu) is None
    assert backend_for("cpu:gloo,cuda:nccl", cpu) == "gloo" and backend_for("cpu:gloo,cuda:nccl", cuda) == "nccl"
    assert backend_for("cuda:nccl", cpu) is None
    check_device(torch.ones(1), DistInfo(0, 2, 0, "cpu:gloo,cuda:nccl"), "x")  # accepted: gloo carries CPU
    check_device(torch.ones(1), DistInfo(0, 2, 0, "gloo"), "x")


def test_one_process_needs_no_group() -> None:
    t = torch.ones(2)
    assert torch.equal(all_reduce_sum(t, DistInfo()), t) and all_reduce_sum(t, DistInfo()) is not t
