"""A real, small training task: scikit-learn's handwritten digits (8x8 images, 10 classes).

Used by ``mpcompile demo`` and the reproduction of the paper's claims. ``load`` splits the 1797
images into a fixed, stratified train/test split; ``build_cnn`` builds a seeded two-conv CNN;
``train`` trains it with the whole step compiled by :func:`mpcompile.compile_train_step` in
FP32, FP16 (FP32 masters, dynamic loss scaling) or BF16, with the same initial weights, the same
batch order and the same optimizer, and measures test accuracy.

scikit-learn is the ``[demo]`` extra; it is imported only by :func:`load`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtypes import from_name

TEST_SIZE = 360  # of 1797 images: 1437 train, 360 test (36 per class, stratified)


@dataclass(frozen=True)
class Digits:
    """The digits split: images as float32 NCHW ``(n, 1, 8, 8)`` with pixels scaled to [0, 1],
    labels as int64 ``(n,)``; ``seed`` chose the split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    seed: int


def load(seed: int = 0) -> Digits:
    """scikit-learn's ``load_digits()`` split into 1437 train / 360 test images, stratified by
    class, the split fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the digits data set comes with scikit-learn: "
                          "pip install 'mpcompile[demo]'") from e
    data = load_digits()
    images = data.images.reshape(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
    xtr, xte, ytr, yte = train_test_split(images, data.target, test_size=TEST_SIZE,
                                          stratify=data.target, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Digits(as_x(xtr), as_y(ytr), as_x(xte), as_y(yte), seed)


class DigitsCNN(nn.Module):
    """conv 3x3 (1->16) + ReLU + max pool -> conv 3x3 (16->32) + BatchNorm + ReLU + max pool ->
    linear (128->10): 8x8 -> 4x4 -> 2x2."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.fc = nn.Linear(2 * channels * 4, classes)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv1(x)), 2)
        y = F.max_pool2d(F.relu(self.bn2(self.conv2(y))), 2)
        return self.fc(y.flatten(1))


def build_cnn(seed: int = 0) -> DigitsCNN:
    """A :class:`DigitsCNN` whose initial weights depend only on ``seed`` (torch's global RNG
    is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, computed in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float(), y)


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Index tensors of every step: a seeded permutation of ``n`` per epoch, cut into full
    batches (the last partial batch is dropped: the compiled step has one batch shape)."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the training set), got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of ``x`` that ``model`` (in eval mode, no gradients) classifies as ``y``."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    return 100.0 * (out.float().argmax(1) == y).float().mean().item()


@dataclass(frozen=True)
class Run:
    """One training run.

    ``losses``/``scales``/``skipped``: per step, the unscaled loss, the loss scale the next step
    uses (1.0 without scaling) and whether the step was skipped on non-finite gradients.
    ``test_accuracy``: the trained FP32 masters (``step.to_module()``) on the test set, in FP32.
    ``test_accuracy_mp``: the mixed-precision forward of the same weights (``convert(model,
    dtype=dtype)``, eval mode), i.e. what a deployed FP16/BF16 model predicts; for FP32 the same
    as ``test_accuracy``. ``train_seconds`` excludes ``compile_seconds``. ``converted``: that
    mixed-precision module (None for FP32)."""

    label: str
    dtype: torch.dtype
    seed: int
    losses: tuple[float, ...]
    scales: tuple[float, ...]
    skipped: tuple[bool, ...]
    test_accuracy: float
    test_accuracy_mp: float
    compile_seconds: float
    train_seconds: float
    step: Any  # the TrainStep
    model: nn.Module  # step.to_module(): the trained FP32 weights
    converted: Any = None  # convert(model, dtype=dtype), eval mode; None for FP32

    @property
    def skips(self) -> int:
        return sum(self.skipped)


def train(data: Digits, dtype: torch.dtype | str, *, seed: int = 0, epochs: int = 10,
          lr: float = 0.05, momentum: float = 0.9, batch_size: int = 64,
          master_weights: bool = True, loss_scale: Any = "default", backend: str = "eager",
          progress: bool = False, label: str | None = None) -> Run:
    """Train :func:`build_cnn` (``seed``) on ``data`` with SGD(lr, momentum), the whole step
    compiled by :func:`mpcompile.compile_train_step` at ``dtype`` (float32: the same pipeline
    with low precision off; float16: FP32 masters and, by default, dynamic loss scaling;
    bfloat16: masters, no scaling). The batch order depends on ``seed`` only, so runs that
    differ in ``dtype`` see the same batches from the same initial weights. ``backend``:
    ``"eager"`` by default, since for a model this small Inductor's compile time (seconds on
    a CPU) outweighs what it saves. ``progress``: a tqdm bar showing loss, scale and skips."""
    from .api import convert
    from .train import compile_train_step

    dtype = from_name(dtype) if isinstance(dtype, str) else dtype
    label = label or str(dtype).removeprefix("torch.")
    model = build_cnn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = batch_order(len(data.y_train), batch_size, epochs, seed)
    x0, y0 = data.x_train[order[0]], data.y_train[order[0]]
    t0 = time.perf_counter()
    step = compile_train_step(model, loss_fn, x0, y0, optimizer=opt, dtype=dtype,
                              loss_scale=loss_scale, master_weights=master_weights,
                              backend=backend)
    compile_s = time.perf_counter() - t0
    losses, scales, skipped = [], [], []
    bar = _bar(len(order), label, progress)
    t0 = time.perf_counter()
    try:
        for idx in order:
            r = step.step(data.x_train[idx], data.y_train[idx])
            losses.append(r.loss.item())
            scales.append(r.loss_scale.item())
            skipped.append(bool(r.skipped.item()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{scales[-1]:g}",
                                skips=sum(skipped), refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t0
    trained = step.to_module().eval()
    acc = accuracy(trained, data.x_test, data.y_test)
    converted = None if dtype is torch.float32 else convert(trained, data.x_test, dtype=dtype)
    acc_mp = acc if converted is None else accuracy(converted, data.x_test, data.y_test)
    return Run(label, dtype, seed, tuple(losses), tuple(scales), tuple(skipped), acc, acc_mp,
               compile_s, train_s, step, trained, converted)


def _bar(total: int, label: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{label:>8}", unit="step", leave=True, dynamic_ncols=True)
