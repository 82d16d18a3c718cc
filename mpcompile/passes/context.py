"""What every pass may read besides the graph: frozen, nothing mutable."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Binding
from ..policy import Policy


@dataclass(frozen=True)
class Context:
    policy: Policy
    device_type: str  # where the graph runs: decides which FP32_ACCUM ops are proven
    model: torch.nn.Module  # read-only: keep_fp32_modules class pins look up module types
    inputs: tuple[Binding, ...]  # what each placeholder is (param, buffer, const, input)

    @property
    def low(self) -> torch.dtype:
        return self.policy.dtype
