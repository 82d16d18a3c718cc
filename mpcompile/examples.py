"""Small models used by the demo, the tests and the benchmarks.

Each :class:`Example` builds a fresh, seeded model, example inputs, targets and a loss, so a
caller can compare mpcompile against FP32 and torch.autocast on identical starting points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    """Conv2d + BatchNorm2d + ReLU, a residual block, max and average pooling, a classifier."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.stem(x)))
        y = F.max_pool2d(y, 2)
        y = F.relu(y + self.bn2(self.conv2(y)))  # residual add
        return self.fc(y.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Token + position embedding, pre-norm multi-head attention (SDPA) and GELU MLP with
    residuals, final LayerNorm and a vocabulary head."""

    def __init__(self, vocab: int = 96, d: int = 64, heads: int = 4, seq: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))


class LSTMModel(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class GRUModel(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 5):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, h = self.gru(x)
        return self.fc(out.mean(1) + h[0])


class CatIndexView(nn.Module):
    """Two branches concatenated, sliced, indexed, viewed and permuted; a dict output."""

    def __init__(self, d: int = 24):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.out = nn.Linear(2 * d, 6)
        self.register_buffer("order", torch.arange(2 * d).flip(0))

    def forward(self, x):
        y = torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], dim=-1)
        y = y[:, self.order]  # index by a buffer
        y = y.view(y.shape[0], 2, -1).permute(0, 2, 1).reshape(y.shape[0], -1)
        first = y[:, :4] * 2.0
        return {"logits": self.out(y), "first": first}


@dataclass(frozen=True)
class Example:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    targets: Callable[[torch.Generator], torch.Tensor]
    loss: Callable[[object, torch.Tensor], torch.Tensor]


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def _xent(out, y):
    return F.cross_entropy(_logits(out).reshape(-1, _logits(out).shape[-1]).float(),
                           y.reshape(-1))


def _seeded(cls, **kw) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return cls(**kw)

    return build


EXAMPLES: dict[str, Example] = {
    e.name: e for e in (
        Example("mlp", _seeded(MLP), lambda g: (torch.randn(16, 32, generator=g),),
                lambda g: torch.randint(0, 10, (16,), generator=g), _xent),
        Example("cnn", _seeded(CNN), lambda g: (torch.randn(8, 3, 16, 16, generator=g),),
                lambda g: torch.randint(0, 10, (8,), generator=g), _xent),
        Example("transformer", _seeded(TransformerBlock),
                lambda g: (torch.randint(0, 96, (4, 16), generator=g),),
                lambda g: torch.randint(0, 96, (4, 16), generator=g), _xent),
        Example("lstm", _seeded(LSTMModel), lambda g: (torch.randn(8, 6, 16, generator=g),),
                lambda g: torch.randint(0, 5, (8,), generator=g), _xent),
        Example("gru", _seeded(GRUModel), lambda g: (torch.randn(8, 6, 16, generator=g),),
                lambda g: torch.randint(0, 5, (8,), generator=g), _xent),
        Example("catindex", _seeded(CatIndexView), lambda g: (torch.randn(8, 24, generator=g),),
                lambda g: torch.randint(0, 6, (8,), generator=g), _xent),
    )
}


def eager_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               loss_fn: Callable, inputs: tuple, targets: object, kwargs: dict | None = None,
               autocast: torch.dtype | None = None, clip: float | None = None):
    """One step of the eager recipe users run today (the reference the compiled step is checked
    against): [torch.autocast] forward and loss, GradScaler-scaled backward, [unscale + clip],
    GradScaler step and update. Returns (loss, total grad norm or None)."""
    kwargs = kwargs or {}
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            loss = loss_fn(model(*inputs, **kwargs), targets)
    else:
        loss = loss_fn(model(*inputs, **kwargs), targets)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    norm = None
    if clip is not None:
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), norm


def batch(example: Example, seed: int = 0) -> tuple[tuple, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return example.inputs(g), example.targets(g)
