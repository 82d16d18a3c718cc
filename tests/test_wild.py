"""Models as people write them: tied weights, tensor constants made in forward, slice
assignment, parameters broadcast into activations (class tokens, position embeddings), keyword
batches with the loss computed by the model, models that fail in plain PyTorch.

Each is a minimal plain-torch model, trained against the oracles of ``test_train.py``
(``convert`` + GradScaler + torch.optim bit for bit; torch.autocast within its bounds).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train import ADAM, SGD, U, compiled, reference, states

import mpcompile
from mpcompile.examples import Example, batch

F16, BF16 = torch.float16, torch.bfloat16
aten = torch.ops.aten


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (every tied language model)."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


class WithConstants(nn.Module):
    """Tensors created inside forward (torch.export lifts them as constants) and a slice of a
    tensor it made assigned a Python number (torchvision's swin attention mask)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        mask = torch.zeros(x.shape[0], 6)
        mask[0:2, :] = 1.0
        return self.fc(x) + torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25, 1.0]) * mask


class TokenModel(nn.Module):
    """A class token and position embeddings broadcast over the batch (ViT/DeiT)."""

    def __init__(self, d_in=12, d=16, t=5, classes=7):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, t + 1, d) * 0.02)
        self.proj = nn.Linear(d_in, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.proj(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        h = self.mix(h)
        return self.head(torch.tanh(h[:, 0]) + h[:, 1:].mean(1))


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls()
    return build


def _xent(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


TIED = Example("tied", _seeded(TiedLM), lambda g: (torch.randint(0, 40, (4, 6), generator=g),),
               lambda g: torch.randint(0, 40, (4, 6), generator=g), _xent)
CONST = Example("const", _seeded(WithConstants), lambda g: (torch.randn(5, 8, generator=g),),
                lambda g: torch.randint(0, 6, (5,), generator=g), _xent)
TOKENS = Example("tokens", _seeded(TokenModel), lambda g: (torch.randn(8, 5, 12, generator=g),),
                 lambda g: torch.randint(0, 7, (8,), generator=g), _xent)
WILD = [TIED, CONST, TOKENS]
# every model, dtype and optimizer runs by default; the other half of the grid under -m slow
CASES = [pytest.param(ex, low, o, marks=() if (i + j + k) % 2 == 0 else pytest.mark.slow)
         for i, ex in enumerate(WILD) for j, low in enumerate((F16, BF16))
         for k, o in enumerate(("sgd", "adam"))]


def _id(v):
    return v.name if isinstance(v, Example) else str(v).replace("torch.", "")


@pytest.mark.parametrize("ex,low,opt", CASES, ids=_id)
def test_trains_bit_exact_against_convert_and_close_to_autocast(ex, low, opt):
    make = SGD if opt == "sgd" else ADAM
    step, results = compiled(ex, low, make, 12)
    model, torch_opt, losses, _ = reference(ex, low, make, 12, "convert")
    assert [r.loss.item() for r in results] == [v.item() for v in losses]
    for key, ours, theirs in states(step, model, torch_opt):
        assert torch.equal(ours, theirs), key
    model, torch_opt, losses, _ = reference(ex, low, make, 12, "autocast")
    for r, ref in zip(results, losses):
        assert abs(r.loss.item() - ref.item()) <= U[low] * abs(ref.item())
    assert not any(bool(r.skipped) for r in results[3:])


def test_tied_weights_one_master_and_the_tie_kept_everywhere(tmp_path):
    step, _ = compiled(TIED, F16, SGD, 3)
    assert step.ties == {"emb.weight": ("head.weight",)}
    assert "master.emb.weight" in step.layout and "master.head.weight" not in step.layout
    assert [n for n in step.layout.names if n.startswith("opt.")] == [
        "opt.emb.weight.momentum_buffer", "opt.fc.weight.momentum_buffer",
        "opt.fc.bias.momentum_buffer"]
    sd = step.state_dict()
    assert sd["master.head.weight"] is sd["master.emb.weight"]
    torch.save(sd, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt")
    assert loaded["master.head.weight"].data_ptr() == loaded["master.emb.weight"].data_ptr()
    step.load_state_dict(loaded)
    bad = dict(sd, **{"master.head.weight": sd["master.emb.weight"] + 1})
    with pytest.raises(mpcompile.TrainStepError, match="one tied parameter"):
        step.load_state_dict(bad)
    m = step.to_module()
    assert m.head.weight is m.emb.weight
    assert torch.equal(m.emb.weight, step.value("master.emb.weight"))
    assert "emb.weight = head.weight" in str(step.report())


def test_tied_weights_export_and_load_back():
    step, _ = compiled(TIED, F16, SGD, 0)
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    x, y = batch(TIED)
    ours = [step(x, y).loss.item() for _ in range(3)]
    theirs = [trainer.step(x, y).loss for _ in range(3)]
    np.testing.assert_allclose(theirs, ours, rtol=8 * U[F16])
    model = TIED.build()
    model.load_state_dict(trainer.model_state_dict())  # strict: needs both names of the tie
    assert model.head.weight is model.emb.weight


def test_constants_and_slice_assignment_export():
    x, y = batch(CONST)
    model = CONST.build().eval()
    mp = mpcompile.convert(model, x, backend="eager")
    onx = mpcompile.export_onnx(mp)
    import onnxruntime as ort

    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x[0].numpy()})
    want = model(*x).detach().numpy()
    np.testing.assert_allclose(got, want, atol=8 * U[F16] * np.abs(want).max())
    step, _ = compiled(CONST, F16, SGD, 0)
    assert step.input_names[-2:] == ("const0", "const1")  # the 1.0 assigned, the tensor
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    ours = [step(x, y).loss.item() for _ in range(3)]
    theirs = [trainer.step(x, y).loss for _ in range(3)]
    np.testing.assert_allclose(theirs, ours, rtol=8 * U[F16])


def test_broadcast_parameters_reduce_their_gradient_in_fp32():
    """The class token's gradient is a sum over the batch. With one target class the
    per-sample terms share their sign: at a static scale where every term fits FP16, their sum
    does not. The step must not skip and must give the FP32 gradient. (The projections are
    frozen: their weight gradients are batch sums written by FP16 matmuls, in autocast too.)"""
    model = TokenModel()
    for m in (model.proj, model.mix, model.head):
        m.requires_grad_(False)
    with torch.no_grad():
        model.head.weight *= 20  # the token's gradient well above the logits' (which are FP16)
    g = torch.Generator().manual_seed(1)
    x = 1.0 + 0.1 * torch.randn(64, 5, 12, generator=g)
    y = torch.zeros(64, dtype=torch.long)
    mp = mpcompile.convert(model, x, backend="eager")
    for name in ("expand", "add"):
        node = next(n for n in mp.graph_module.graph.nodes if n.name == name)
        assert node.meta["mp"].precision is torch.float32, name
        assert "sums the gradient of parameter" in mp.explain(name)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    per_sample = torch.func.vmap(torch.func.grad(
        lambda p, xi, yi: F.cross_entropy(torch.func.functional_call(
            ref, {**dict(ref.named_parameters()), "cls": p}, (xi[None],)), yi[None],
            reduction="sum")), in_dims=(None, 0, 0))(ref.cls.detach(), x, y)
    scale = 2.0 ** int(np.floor(np.log2(30000 / per_sample.abs().max().item())))
    assert (per_sample * scale).abs().max() < 65504  # each term fits FP16 ...
    assert not torch.isfinite((per_sample * scale).half().sum(0)).all()  # ... their sum does not
    step = mpcompile.compile_train_step(
        model, lambda out, t: F.cross_entropy(out.float(), t, reduction="sum"), x, y,
        optimizer=mpcompile.optim.SGD(lr=1.0), loss_scale=scale, backend="eager")
    before = step.value("master.cls").clone()
    r = step(x, y)
    assert not bool(r.skipped)
    grad = before - step.value("master.cls")  # lr 1: the update is the gradient
    torch.testing.assert_close(grad, ref.cls.grad, rtol=2e-2, atol=1e-3 * grad.abs().max())


class HFStyle(nn.Module):
    """Keyword inputs, labels optional, the loss computed inside and returned in a dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8)
        self.out = nn.Linear(8, 30)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        logits = self.out(h)
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, 30).float(),
                                                          labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def test_keyword_batches_and_the_models_own_loss():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 7), generator=g)
    mask = torch.ones(3, 7)
    b = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    m1, m2 = HFStyle(), HFStyle()
    s1 = mpcompile.compile_train_step(m1, batch=b, optimizer=SGD(m1.parameters()), backend="eager")
    s2 = mpcompile.compile_train_step(
        m2, lambda out, y: F.cross_entropy(out["logits"].reshape(-1, 30).float(), y.reshape(-1)),
        {"input_ids": ids, "attention_mask": mask}, ids, optimizer=SGD(m2.parameters()),
        backend="eager")
    for _ in range(4):  # the model's loss is inside the compiled forward: FP32 rounding apart
        a = s1(b)
        c = s2({"input_ids": ids, "attention_mask": mask}, ids)
        assert abs(a.loss.item() - c.loss.item()) <= 4 * 2.0**-24 * c.loss.item()
    torch.testing.assert_close(s1.value("master.out.weight"), s2.value("master.out.weight"),
                               rtol=0, atol=1e-6)
    with pytest.raises(mpcompile.SignatureError, match="kwargs"):
        s1({"input_ids": ids, "labels": ids})
    with pytest.raises(mpcompile.TrainStepError, match="no loss_fn"):
        mpcompile.compile_train_step(HFStyle(), None, {"input_ids": ids}, ids,
                                     optimizer=mpcompile.optim.SGD(), backend="eager")
    with pytest.raises(mpcompile.TrainStepError, match="outputs.loss is None|no loss"):
        mpcompile.compile_train_step(HFStyle(), batch={"input_ids": ids},
                                     optimizer=mpcompile.optim.SGD(), backend="eager")
    mp = mpcompile.convert(HFStyle(), {"input_ids": ids, "attention_mask": mask}, backend="eager")
    assert mp(input_ids=ids, attention_mask=mask)["logits"].shape == (3, 7, 30)


def test_a_model_that_fails_in_plain_pytorch_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(mpcompile.CaptureError, match="fails in plain PyTorch too") as e:
        mpcompile.convert(model, torch.randn(1, 4), backend="eager")
    assert "Expected more than 1 value per channel" in str(e.value)
    assert "torch.export" not in str(e.value)
    assert model[1].num_batches_tracked.item() == 0  # the eager check ran on a copy
