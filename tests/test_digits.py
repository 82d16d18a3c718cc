"""mpcompile.digits: the split, the CNN, and training checked against plain torch FP32."""

import sys

import pytest
import torch

pytest.importorskip("sklearn")

from mpcompile import digits  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return digits.load(0)


def test_split_is_stratified_scaled_and_fixed_by_seed(data):
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0  # 0..16 scaled by 1/16
    # stratified: each class's share of the test set is its share of the whole, +-1 image
    total = torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=10)
    want = total * 360 / 1797
    assert ((torch.bincount(data.y_test, minlength=10) - want).abs() <= 1).all()
    again, other = digits.load(0), digits.load(1)
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    assert not torch.equal(other.x_test, data.x_test)
    # the two halves together are the whole data set (every image once)
    from sklearn.datasets import load_digits
    full = torch.tensor(load_digits().images.reshape(-1, 64) / 16.0, dtype=torch.float32)
    both = torch.cat([data.x_train, data.x_test]).reshape(-1, 64)
    assert torch.equal(torch.sort(both.sum(1)).values, torch.sort(full.sum(1)).values)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'mpcompile\[demo\]'"):
        digits.load()


def test_build_cnn_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = digits.build_cnn(3), digits.build_cnn(3), digits.build_cnn(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_batch_order_drops_the_partial_batch_and_covers_each_epoch_once():
    order = digits.batch_order(10, 4, 2, seed=0)
    assert [len(i) for i in order] == [4, 4, 4, 4]
    assert len(set(torch.cat(order[:2]).tolist())) == 8  # no index twice within an epoch
    assert all(torch.equal(a, b) for a, b in zip(order, digits.batch_order(10, 4, 2, seed=0)))
    with pytest.raises(ValueError, match="batch_size"):
        digits.batch_order(10, 11, 1, seed=0)


def plain_torch(data, seed, epochs, lr=0.05, momentum=0.9, batch_size=64):
    """The oracle: the same model, batches and optimizer, trained by torch in FP32."""
    model = digits.build_cnn(seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for idx in digits.batch_order(len(data.y_train), batch_size, epochs, seed):
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, digits.accuracy(model, data.x_test, data.y_test)


EPOCHS = 10  # the demo's default: converged enough that accuracy noise is below a point


@pytest.fixture(scope="module")
def reference(data):
    torch.set_num_threads(1)
    return plain_torch(data, seed=0, epochs=EPOCHS)


def test_fp32_step_trains_as_plain_torch(data, reference):
    run = digits.train(data, "float32", seed=0, epochs=EPOCHS)
    ref_losses, ref_acc = reference
    assert len(run.losses) == len(ref_losses) == EPOCHS * (1437 // 64)
    # same arithmetic up to FP32 reassociation: step by step, the losses agree closely
    assert torch.allclose(torch.tensor(run.losses), torch.tensor(ref_losses), rtol=1e-3,
                          atol=1e-4)
    assert abs(run.test_accuracy - ref_acc) <= 0.6  # at most 2 of 360 images differ
    assert run.test_accuracy > 95
    assert run.scales == (1.0,) * len(run.losses) and run.skips == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_matches_fp32_accuracy(data, reference, dtype):
    run = digits.train(data, dtype, seed=0, epochs=EPOCHS)
    ref_losses, ref_acc = reference
    assert abs(run.test_accuracy - ref_acc) <= 1.0, (run.test_accuracy, ref_acc)
    assert abs(run.test_accuracy_mp - ref_acc) <= 1.0, (run.test_accuracy_mp, ref_acc)
    # the loss falls as FP32's does: the last epoch's mean within 30 % of FP32's
    last = len(ref_losses) // EPOCHS
    mean = lambda xs: sum(xs[-last:]) / last  # noqa: E731
    assert mean(run.losses) < 0.2 and abs(mean(run.losses) - mean(ref_losses)) < \
        0.3 * mean(ref_losses) + 0.01
    if dtype == "float16":  # dynamic scaling: the scale starts at 2^16 and only moves by 2x
        assert all(s >= 1 and (s == 2 ** round(torch.tensor(s).log2().item()))
                   for s in run.scales)
    else:
        assert set(run.scales) == {1.0}
    assert run.model is not run.step and isinstance(run.model, digits.DigitsCNN)
