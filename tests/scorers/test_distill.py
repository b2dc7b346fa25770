"""Distillation building blocks: DSA (Siamese, differentiable, exact ops), DM and CF losses, FYI flip, ConvNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scorers.distill import (
    DSA_STRATEGY,
    cf_loss,
    convnet,
    dm_loss,
    dsa_augment,
    flip_concat,
    sample_frequencies,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def _batch(n: int, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", OPS)
def test_siamese_same_seed_same_transform_for_every_image(op: str) -> None:
    # Siamese: one parameter draw for the whole batch, independent of the batch size, so a real batch of 7 and a
    # synthetic batch of 3 augmented with the same seed get exactly the transformation of the joint batch.
    real, syn = _batch(7, seed=1), _batch(3, seed=2)
    for seed in range(5):
        joint = dsa_augment(torch.cat([real, syn]), seed=seed, strategy=op)
        a = dsa_augment(real, seed=seed, strategy=op)
        b = dsa_augment(syn, seed=seed, strategy=op)
        torch.testing.assert_close(torch.cat([a, b]), joint, rtol=1e-5, atol=1e-5)


def test_siamese_flip_is_all_or_nothing_and_per_image_mode_mixes() -> None:
    x = _batch(1).expand(64, -1, -1, -1).contiguous()
    flipped_counts = set()
    for seed in range(20):
        out = dsa_augment(x, seed=seed, strategy="flip")
        n_flipped = sum(bool(torch.equal(o, x[0].flip(-1))) for o in out)
        assert n_flipped in (0, 64)
        flipped_counts.add(n_flipped)
    assert flipped_counts == {0, 64}  # both outcomes happen across seeds
    out = dsa_augment(x, seed=3, siamese=False, strategy="flip")
    n_flipped = sum(bool(torch.equal(o, x[0].flip(-1))) for o in out)
    assert 10 < n_flipped < 54


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_differentiable_and_deterministic(op: str) -> None:
    x = _batch(4).requires_grad_(True)
    out = dsa_augment(x, seed=11, strategy=op)
    assert out.shape == x.shape
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(dsa_augment(x.detach(), seed=11, strategy=op), out.detach())


def test_crop_is_a_zero_filled_shift_within_an_eighth() -> None:
    x = torch.arange(1, 1 + 2 * 16 * 16, dtype=torch.float32).view(1, 2, 16, 16)
    shifts = set()
    for seed in range(30):
        out = dsa_augment(x, seed=seed, strategy="crop")[0]
        found = None
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                ref = torch.zeros_like(x[0])
                # out[i, j] = x[i + dx, j + dy] where inside, else 0
                src = x[0, :, max(dx, 0):16 + min(dx, 0), max(dy, 0):16 + min(dy, 0)]
                ref[:, max(-dx, 0):16 - max(dx, 0), max(-dy, 0):16 - max(dy, 0)] = src
                if torch.equal(out, ref):
                    found = (dx, dy)
        assert found is not None, f"seed {seed}: crop is not a zero-filled shift by at most 2 pixels"
        shifts.add(found)
    assert len(shifts) > 5


def test_cutout_zeroes_one_square_of_half_the_side() -> None:
    x = torch.ones(5, 1, 16, 16)
    out = dsa_augment(x, seed=4, siamese=False, strategy="cutout")
    for img in out[:, 0]:
        zero = (img == 0).nonzero()
        rows, cols = zero[:, 0], zero[:, 1]
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h <= 8 and w <= 8 and len(zero) == h * w  # one axis-aligned rectangle, at most 8×8 (clipped at borders)


def test_mode_m_applies_all_and_strategy_none_is_identity() -> None:
    x = _batch(3)
    assert dsa_augment(x, seed=0, strategy="none") is x
    out = dsa_augment(x, seed=0, strategy=DSA_STRATEGY, mode="M")
    assert out.shape == x.shape and not torch.allclose(out, x)
    with pytest.raises(ValueError, match="unknown DSA operations"):
        dsa_augment(x, seed=0, strategy="color_blur")


def test_dm_loss_is_squared_distance_of_means() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(3, 8, generator=g)
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    assert float(dm_loss(a, b)) == pytest.approx(expected, rel=1e-6)
    assert float(dm_loss(a, a[torch.randperm(50, generator=g)])) == pytest.approx(0.0, abs=1e-10)


def test_cf_loss_with_unit_weights_is_the_complex_cf_distance() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g) + 0.5
    t = sample_frequencies(64, 6, generator=g)
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    phi_a = torch.exp(1j * (t @ an.T).to(torch.complex64)).mean(1)
    phi_b = torch.exp(1j * (t @ bn.T).to(torch.complex64)).mean(1)
    expected = float((phi_a - phi_b).abs().mean())
    assert float(cf_loss(a, b, t=t, alpha=1.0, beta=1.0)) == pytest.approx(expected, rel=1e-4)
    # identical sets: zero up to float32 rounding under the square root
    assert float(cf_loss(a, a, t=t)) == pytest.approx(0.0, abs=1e-3)


def test_cf_loss_separates_distributions_and_has_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    real = torch.randn(400, 16, generator=g)
    same = torch.randn(50, 16, generator=g).requires_grad_(True)
    other = (torch.randn(50, 16, generator=g) + torch.linspace(0, 2, 16)).requires_grad_(True)
    t = sample_frequencies(512, 16, generator=g)
    l_same, l_other = cf_loss(real, same, t=t), cf_loss(real, other, t=t)
    assert float(l_other.detach()) > 2 * float(l_same.detach())
    l_other.backward()
    assert torch.isfinite(other.grad).all() and other.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="t must be"):
        cf_loss(real, same, t=t[:, :3])


def test_flip_concat_gradient_sums_both_orientations() -> None:
    x = _batch(2, side=5).requires_grad_(True)
    y = flip_concat(x)
    assert y.shape == (4, 3, 5, 5)
    torch.testing.assert_close(y[2:], x.flip(-1))
    w = torch.randn_like(y)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w[:2] + w[2:].flip(-1))


def test_convnet_shapes_seed_and_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    net = convnet(3, 10, width=16, depth=3, image_size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert net.feature_dim == 16 * 4 * 4
    assert net.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 256)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    same = convnet(3, 10, width=16, depth=3, image_size=32, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), same.parameters()))
    # one-channel 28 px (Fashion-MNIST): the first conv pads by 3 (28 -> 32), as the reference ConvNet
    grey = convnet(1, 10, width=8, depth=3, image_size=28, seed=0)
    assert grey.feature_dim == 8 * 4 * 4 and grey.embed(torch.zeros(1, 1, 28, 28)).shape == (1, 128)
    kinds = [type(m).__name__ for m in grey.features]
    assert kinds[:4] == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"]
    np.testing.assert_equal(grey.features[1].num_groups, 8)  # instance norm = one group per channel
