"""Training runs shared by claims (b) and (c): the digits CNN (:mod:`mpcompile.digits`) with the
whole step compiled by :func:`mpcompile.compile_train_step`, plus an eager FP32 torch run (the
oracle) over the same batches from the same initial weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import digits


@dataclass(frozen=True)
class Curve:
    """One run: per step the loss (unscaled, as the model's loss function returns it, times
    ``loss_factor`` undone), the loss scale the next step uses, whether the step was skipped;
    the trained weights' test accuracy (FP32 forward, percent); whatever ``observe`` returned
    per step."""

    label: str
    losses: tuple[float, ...]
    scales: tuple[float, ...]
    skipped: tuple[bool, ...]
    test_accuracy: float
    observed: tuple[Any, ...] = ()
    model: torch.nn.Module | None = None  # the trained FP32 weights (compiled runs)

    @property
    def skips(self) -> int:
        return sum(self.skipped)

    def mean_loss(self, first: int | None = None, last: int | None = None) -> float:
        xs = self.losses[:first] if first else self.losses[-last:] if last else self.losses
        return sum(xs) / len(xs)


def scaled_loss(factor: float) -> Callable:
    """``digits.loss_fn`` times ``factor`` (a model whose gradients are ``factor`` times
    smaller)."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return digits.loss_fn(logits, y) * factor

    return loss


def compiled(data: digits.Digits, label: str, *, seed: int, epochs: int, lr: float,
             momentum: float = 0.0, batch_size: int = 64, dtype: torch.dtype = torch.float16,
             loss_scale: Any = "default", master_weights: bool = True,
             loss_factor: float = 1.0, observe: Callable | None = None,
             observe_every: int = 1, pbar=None) -> Curve:
    """Train ``digits.build_cnn(seed)`` with a compiled step (SGD(lr, momentum); the loss is
    ``digits.loss_fn`` x ``loss_factor``). ``observe(step, before, x, y)``, if given, is called
    after every ``observe_every``-th step (the first included) with the state tensors as they
    were before it (clones) and the batch. Skipped steps are recorded, not warned about."""
    from ..train import compile_train_step

    model = digits.build_cnn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = digits.batch_order(len(data.y_train), batch_size, epochs, seed)
    step = compile_train_step(model, scaled_loss(loss_factor), data.x_train[order[0]],
                              data.y_train[order[0]], optimizer=opt, dtype=dtype,
                              loss_scale=loss_scale, master_weights=master_weights,
                              backend="eager")
    step.warn_after_skips = 0  # the curve records every skip
    losses, scales, skipped, seen = [], [], [], []
    for i, idx in enumerate(order):
        watch = observe is not None and i % observe_every == 0
        before = [t.clone() for t in step.state] if watch else None
        r = step.step(data.x_train[idx], data.y_train[idx])
        losses.append(r.loss.item() / loss_factor)
        scales.append(r.loss_scale.item())
        skipped.append(bool(r.skipped.item()))
        if watch:
            seen.append(observe(step, before, data.x_train[idx], data.y_train[idx]))
    if pbar is not None:
        pbar.update(1)
    trained = step.to_module()
    acc = digits.accuracy(trained, data.x_test, data.y_test)
    return Curve(label, tuple(losses), tuple(scales), tuple(skipped), acc, tuple(seen), trained)


def eager_fp32(data: digits.Digits, *, seed: int, epochs: int, lr: float,
               momentum: float = 0.0, batch_size: int = 64, loss_factor: float = 1.0,
               pbar=None) -> Curve:
    """The same training in plain PyTorch, FP32, torch.optim.SGD: the oracle."""
    model = digits.build_cnn(seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = scaled_loss(loss_factor)
    losses = []
    for idx in digits.batch_order(len(data.y_train), batch_size, epochs, seed):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item() / loss_factor)
    if pbar is not None:
        pbar.update(1)
    acc = digits.accuracy(model, data.x_test, data.y_test)
    n = len(losses)
    return Curve("FP32 (eager torch)", tuple(losses), (1.0,) * n, (False,) * n, acc)
