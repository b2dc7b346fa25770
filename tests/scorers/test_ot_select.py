"""Tests for scorers.ot_select (TAROT-style OT targeted selection) against POT's own solutions."""
from __future__ import annotations

import numpy as np
import ot
import pytest

from scorers.ot_select import (
    c_transform,
    estimate_selection_ratio,
    fit_whitening,
    ot_scores,
    target_potential,
)


def _two_domains(n_a: int, n_b: int, d: int = 8, gap: float = 6.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d))
    b = rng.normal(size=(n_b, d))
    b[:, 0] += gap
    pool = np.concatenate([a, b]).astype(np.float32)
    is_a = np.r_[np.ones(n_a, bool), np.zeros(n_b, bool)]
    return pool, is_a


# --- whitening --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_whitening_gives_identity_covariance_and_flattens_dominant_direction(method: str) -> None:
    rng = np.random.default_rng(1)
    d = 6
    # Strongly anisotropic, correlated data: one direction 30x the others.
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = (rng.normal(size=(4000, d)) * np.r_[30.0, 3.0, 1.0, 1.0, 0.5, 0.2]) @ basis.T + 5.0
    w = fit_whitening(x, method=method, ridge=1e-9)
    z = w.apply(x)
    assert z.dtype == np.float32
    cov = np.cov(z.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(d), atol=1e-3)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    # Before: the top principal direction holds > 90 % of the variance; after: every direction holds 1/d.
    lam_before = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    lam_after = np.linalg.eigvalsh(cov)
    assert lam_before[-1] / lam_before.sum() > 0.9
    assert lam_after[-1] / lam_after.sum() < 1.01 / d


def test_whitening_ridge_shrinks_noise_directions_and_chunking_is_exact() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 4)) * np.r_[1.0, 1.0, 1.0, 1e-4]
    w = fit_whitening(x, ridge=0.1)
    var = np.var(w.apply(x).astype(np.float64), axis=0, ddof=1)
    assert var[3] < 0.01  # a near-empty direction is not inflated to unit variance
    np.testing.assert_array_equal(w.apply(x, chunk=7), w.apply(x))


def test_whitening_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="x_sample"):
        fit_whitening(np.zeros(5))
    with pytest.raises(ValueError, match="method"):
        fit_whitening(np.random.default_rng(0).normal(size=(10, 2)), method="pca")  # type: ignore[arg-type]
    w = fit_whitening(np.random.default_rng(0).normal(size=(10, 2)))
    with pytest.raises(ValueError, match="shape"):
        w.apply(np.zeros((3, 5)))


# --- potentials agree with POT ----------------------------------------------------------------------------------------


def test_soft_c_transform_matches_pot_sinkhorn_potential() -> None:
    rng = np.random.default_rng(3)
    xs, xt = rng.normal(size=(60, 3)), rng.normal(size=(25, 3)) + 0.5
    eps = 0.05
    f, g, info = target_potential(xs, xt, eps=eps, num_iter=5000, stop_thr=1e-10)
    # Independent reference: POT's standard (non-log) Sinkhorn at the same reg on the same normalised cost.
    cost = ot.dist(xs, xt) / info["cost_scale"]
    a, b = np.full(60, 1 / 60), np.full(25, 1 / 25)
    plan_ref = ot.sinkhorn(a, b, cost, eps, numItermax=20000, stopThr=1e-11)
    f_stream = c_transform(xs, xt, g, eps=eps, cost_scale=info["cost_scale"], chunk=7, device="cpu")
    # f from the c-transform equals POT's f up to eps*log(a_i) = constant.
    diff = f - f_stream
    np.testing.assert_allclose(diff, diff.mean(), atol=1e-9)
    np.testing.assert_allclose(diff.mean(), eps * np.log(1 / 60), atol=1e-9)
    # And the plan rebuilt from (f_stream, g) is POT's entropic plan.
    plan = np.exp((f_stream[:, None] + g[None, :] - cost) / eps) / 60
    np.testing.assert_allclose(plan, plan_ref, atol=1e-6)


def test_hard_c_transform_matches_pot_emd_duals() -> None:
    rng = np.random.default_rng(4)
    xs, xt = rng.normal(size=(40, 2)), rng.normal(size=(15, 2))
    f, g, info = target_potential(xs, xt, eps=0.0)
    f_ct = c_transform(xs, xt, g, eps=0.0, cost_scale=info["cost_scale"], device="cpu")
    np.testing.assert_allclose(f_ct, f, atol=1e-9)
    cost = ot.dist(xs, xt) / info["cost_scale"]
    # Strong duality: sum a f + sum b g = exact OT cost.
    assert np.isclose(f_ct.mean() + g.mean(), ot.emd2(np.full(40, 1 / 40), np.full(15, 1 / 15), cost), atol=1e-9)


def test_streaming_equals_dense() -> None:
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(3001, 5)).astype(np.float32)
    target = rng.normal(size=(40, 5)).astype(np.float32) + 0.3
    dense = ot_scores(pool, target, eps=0.1, sample_size=500, chunk=10**6, device="cpu")
    streamed = ot_scores(pool, target, eps=0.1, sample_size=500, chunk=128, device="cpu")
    np.testing.assert_allclose(streamed.score, dense.score, rtol=0, atol=1e-6)
    # Dense reference computed directly, without the streaming code path.
    wh = dense.whitening
    assert wh is not None
    cost = ot.dist(wh.apply(pool).astype(np.float64), dense.target_points.astype(np.float64))
    cost /= dense.info["cost_scale"]
    f = -0.1 * np.log(np.exp((dense.target_potential[None, :] - cost) / 0.1).sum(1))
    np.testing.assert_allclose(dense.score, -f, atol=1e-4)


# --- selection behaviour ----------------------------------------------------------------------------------------------


def test_fixed_budget_picks_target_domain() -> None:
    pool, is_a = _two_domains(2000, 2000, seed=6)
    rng = np.random.default_rng(7)
    target = rng.normal(size=(100, 8)).astype(np.float32)  # drawn from domain A's distribution
    res = ot_scores(pool, target, eps=0.05, sample_size=1500, device="cpu")
    assert res.score.shape == (4000,) and res.score.dtype == np.float32
    top = np.argsort(-res.score)[:1000]
    assert is_a[top].mean() >= 0.95
    assert res.info["orientation"].startswith("higher")


def test_exact_mode_also_selects_target_domain() -> None:
    pool, is_a = _two_domains(600, 600, seed=8)
    target = np.random.default_rng(9).normal(size=(60, 8)).astype(np.float32)
    res = ot_scores(pool, target, eps=0.0, sample_size=600, device="cpu")
    top = np.argsort(-res.score)[:300]
    assert is_a[top].mean() >= 0.95


@pytest.mark.parametrize("share", [0.15, 0.4])
def test_otm_ratio_lands_near_the_known_in_domain_share(share: float) -> None:
    # Pool: a known share of rows from the target's domain (8-d Gaussian around 6 e0), the rest from another domain
    # (around 6 e1); target = 100 fresh rows of the target domain. TAROT's OTM (per-target neighbourhoods grown until
    # the OT distance to the other folds stops falling, union over folds) must return about that share.
    n, d = 4000, 8
    n_a = int(share * n)
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(n_a, d)), rng.normal(size=(n - n_a, d))
    a[:, 0] += 6.0
    b[:, 1] += 6.0
    pool = np.concatenate([a, b]).astype(np.float32)
    is_a = np.r_[np.ones(n_a, bool), np.zeros(n - n_a, bool)]
    target = np.random.default_rng(13).normal(size=(100, d)).astype(np.float32)
    target[:, 0] += 6.0
    est = estimate_selection_ratio(pool, target, k_folds=5, n_grid=30, subsample=1500, sample_size=2000, device="cpu")
    assert 0.7 * share <= est.ratio <= 1.3 * share, (est.ratio, share)
    assert is_a[est.selected].mean() >= 0.85
    assert est.k == est.selected.size == len(np.unique(est.selected))
    assert len(est.distance) == len(est.k_grid) == len(est.ratios) and len(est.distance_per_fold[0]) == 5
    # The curve is U-shaped: the whole pool is clearly farther than the minimum, and so is a single neighbour.
    assert est.distance[-1] > 1.2 * min(est.distance) and est.distance[0] > 1.05 * min(est.distance)
    assert est.ratios == sorted(est.ratios)


def test_otm_topk_stream_equals_dense_and_first_increase_stops_early() -> None:
    from scorers.arrays import unit_rows as _unit
    from scorers.ot_select import _topk_per_target

    rng = np.random.default_rng(14)
    pool = rng.normal(size=(700, 6)).astype(np.float32)
    tgt = _unit(rng.normal(size=(9, 6)))
    sims, idx = _topk_per_target(pool, _unit, tgt, 50, chunk=64, device="cpu")
    dense = _unit(pool) @ tgt.T
    ref = np.argsort(-dense, axis=0, kind="stable")[:50]
    np.testing.assert_allclose(sims, np.take_along_axis(dense, ref, 0), atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(dense, idx, 0), sims, atol=1e-6)
    pool2, _ = _two_domains(600, 1400, d=4, seed=15)
    target = np.random.default_rng(16).normal(size=(60, 4)).astype(np.float32)
    full = estimate_selection_ratio(pool2, target, k_folds=3, n_grid=20, device="cpu")
    early = estimate_selection_ratio(pool2, target, k_folds=3, n_grid=20, stop="first_increase", device="cpu")
    assert np.isnan(np.asarray(early.distance_per_fold)).any()  # later k never evaluated
    assert all(ke <= kf for ke, kf in zip(early.fold_choice, full.fold_choice))


# --- gradient features ------------------------------------------------------------------------------------------------


def test_gradient_features_match_autograd_and_jl_preserves_geometry() -> None:
    import torch

    from scorers.ot_select import fit_proxy_head, gradient_features

    rng = np.random.default_rng(17)
    emb = rng.normal(size=(400, 5)).astype(np.float32)
    labels = np.array(["cat", "dog", "eel"])[emb[:, :3].argmax(1)]
    head = fit_proxy_head(emb, labels, epochs=30, seed=0)
    assert head.info["train_acc"] > 0.8
    # Reference: per-sample autograd gradient of the cross-entropy w.r.t. W, flattened, then the same projection.
    x = torch.from_numpy(head.inputs(emb[:7]))
    w = torch.from_numpy(head.weight).requires_grad_(True)
    codes = np.searchsorted(head.classes, labels[:7])
    ref = []
    for i in range(7):
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x[i:i + 1] @ w.T, torch.tensor(codes[i:i + 1])), w)
        ref.append(g.numpy().reshape(-1))
    ref = np.stack(ref)
    exact = gradient_features(emb[:7], head, labels[:7], grad_dim=4096, seed=3, chunk=2)
    rproj = np.random.default_rng(3).integers(0, 2, size=(ref.shape[1], 4096), dtype=np.int8) * 2 - 1
    np.testing.assert_allclose(exact, ref @ rproj / np.sqrt(4096), atol=1e-4)
    # JL: inner products are preserved on average.
    np.testing.assert_allclose(exact @ exact.T, ref @ ref.T, atol=0.15 * np.abs(ref @ ref.T).max())
    # Streaming is exact and seeded; labels=None uses the predicted label.
    np.testing.assert_array_equal(gradient_features(emb, head, labels, grad_dim=32, seed=1, chunk=13),
                                  gradient_features(emb, head, labels, grad_dim=32, seed=1, chunk=4096))
    pred = head.classes[head.proba(emb).argmax(1)]
    np.testing.assert_array_equal(gradient_features(emb, head, None, grad_dim=32, seed=1),
                                  gradient_features(emb, head, pred, grad_dim=32, seed=1))
    with pytest.raises(ValueError, match="not trained on"):
        gradient_features(emb[:3], head, np.array(["cat", "cow", "dog"]))


def test_gradient_route_selects_the_target_classes() -> None:
    from scorers.ot_select import fit_proxy_head, gradient_features

    # Pool: 4 classes in 6-d; the target holds rows of classes 0 and 1 only, unlabelled (predicted labels).
    rng = np.random.default_rng(18)
    centers = rng.normal(size=(4, 6)) * 4
    y = rng.integers(0, 4, size=2000)
    pool = (centers[y] + rng.normal(size=(2000, 6))).astype(np.float32)
    yt = rng.integers(0, 2, size=80)
    target = (centers[yt] + rng.normal(size=(80, 6))).astype(np.float32)
    head = fit_proxy_head(pool, y, epochs=20, seed=0)
    gp = gradient_features(pool, head, y, grad_dim=64, seed=0)
    gt = gradient_features(target, head, None, grad_dim=64, seed=0)
    res = ot_scores(gp, gt, eps=0.05, sample_size=1000, device="cpu")
    top = np.argsort(-res.score)[:800]
    assert np.isin(y[top], (0, 1)).mean() >= 0.9


def test_ot_scores_rejects_bad_input() -> None:
    pool = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="target_emb"):
        ot_scores(pool, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="eps"):
        ot_scores(pool, np.ones((4, 3)), eps=-1)
    with pytest.raises(ValueError, match="max_ratio"):
        estimate_selection_ratio(pool, np.ones((4, 3)), k_folds=2, max_ratio=2.0)
    with pytest.raises(ValueError, match="stop"):
        estimate_selection_ratio(pool, np.ones((4, 3)), k_folds=2, stop="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_folds"):
        estimate_selection_ratio(pool, np.ones((4, 3)), k_folds=9)
