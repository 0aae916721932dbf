"""The optimizers a recipe names (``train.optimizer``): torch's AdamW and bitsandbytes' 8-bit AdamW."""

from __future__ import annotations

import pytest
import torch

from dpo.recipe import TrainConfig
from dpo.train.loop import build_optimizer

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("adamw_8bit", "AdamW8bit"),
                                           ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_build_optimizer_gives_the_named_optimizer_and_it_descends(name, cls):
    cls = getattr(bnb.optim, cls) if isinstance(cls, str) else cls
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 4096 values: the 8-bit optimizers quantize its state
    optimizer = build_optimizer([weight], TrainConfig(optimizer=name, lr=0.01, weight_decay=0.1))
    assert type(optimizer) is cls
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.1
    losses = []
    for _ in range(5):
        loss = weight.square().sum()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(b < a for a, b in zip(losses, losses[1:]))
    if name != "adamw":
        assert optimizer.state[weight]["state1"].dtype == torch.uint8  # 8-bit moments


def test_8bit_adamw_tracks_torch_adamw():
    """Same first steps as torch's AdamW up to 8-bit rounding of the moments."""
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    results = {}
    for name in ("adamw", "adamw_8bit"):
        weight = torch.nn.Parameter(start.clone())
        optimizer = build_optimizer([weight], TrainConfig(optimizer=name, lr=0.001))
        for step in range(3):
            (weight * torch.linspace(-1, 1, 4096).reshape(64, 64) * (step + 1)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = weight.detach()
    moved = (results["adamw"] - start).abs().mean()
    assert (results["adamw_8bit"] - results["adamw"]).abs().mean() < 0.05 * moved
