"""EL2N / GraNd: synthetic data with known easy, boundary and mislabeled rows; exact gradient checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
import torch.nn.functional as F
from torch import nn

from scorers.el2n import (
    EL2NResult,
    el2n_embedding_scores,
    el2n_model_scores,
    encode_labels,
    per_example_grad_norms,
)
from scorers.nets import BatchedHeads


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_gaussians(n: int = 2000, d: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Two classes split along axis 0: far rows at |x0| in [2, 4] on their class's side, a boundary band
    at |x0| < 0.2 (labels there are coin flips), and 10% of the rows flipped, drawn from the far rows."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(scale=0.5, size=(n, d))
    boundary = rng.random(n) < 0.15
    side = np.where(y == 1, 1.0, -1.0)
    x[:, 0] = np.where(boundary, rng.uniform(-0.2, 0.2, n), side * rng.uniform(2.0, 4.0, n))
    far = np.flatnonzero(~boundary)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(far, size=n // 10, replace=False)] = True
    y_obs = np.where(flipped, 1 - y, y)
    return {"x": x.astype(np.float32), "y": y_obs, "flipped": flipped, "boundary": boundary}


@pytest.fixture(scope="module")
def blobs() -> dict[str, np.ndarray]:
    return two_gaussians()


@pytest.fixture(scope="module")
def linear_scores(blobs: dict[str, np.ndarray]) -> EL2NResult:
    return el2n_embedding_scores(blobs["x"], blobs["y"])


def top_share(scores: np.ndarray, mask: np.ndarray, frac: float) -> float:
    """Share of the rows in `mask` that land in the top `frac` of `scores`."""
    top = np.argsort(-scores, kind="stable")[: int(round(frac * scores.shape[0]))]
    return float(mask[top].sum() / mask.sum())


def test_flipped_and_boundary_rows_score_high(linear_scores: EL2NResult, blobs: dict[str, np.ndarray]) -> None:
    el2n = linear_scores.el2n
    assert el2n.dtype == np.float32 and el2n.shape == blobs["y"].shape
    assert top_share(el2n, blobs["flipped"], 0.15) >= 0.8
    clean_far = ~blobs["flipped"] & ~blobs["boundary"]
    clean_boundary = ~blobs["flipped"] & blobs["boundary"]
    # Boundary rows are ambiguous: typically harder than 95% of the clean far rows, easier than mislabels.
    assert np.median(el2n[clean_boundary]) > np.quantile(el2n[clean_far], 0.95)
    assert np.median(el2n[blobs["flipped"]]) > np.quantile(el2n[clean_boundary], 0.9)
    assert 0.0 <= el2n.min() and el2n.max() <= np.sqrt(2) + 1e-6  # ‖p − onehot‖ ≤ √2


def test_linear_grand_is_el2n_times_norm_factor(linear_scores: EL2NResult, blobs: dict[str, np.ndarray]) -> None:
    factor = np.sqrt((blobs["x"].astype(np.float64) ** 2).sum(1) + 1.0)
    np.testing.assert_allclose(linear_scores.grand, linear_scores.el2n * factor, rtol=1e-5)


def test_linear_grand_ranks_like_el2n_on_unit_embeddings(blobs: dict[str, np.ndarray]) -> None:
    x = blobs["x"] / np.linalg.norm(blobs["x"], axis=1, keepdims=True)
    r = el2n_embedding_scores(x, blobs["y"], n_seeds=2, n_folds=3)
    np.testing.assert_allclose(r.grand, r.el2n * np.sqrt(2.0), rtol=1e-5)
    # Same ranking (float32 norms of unit rows differ from 1 by ~1e-7, which may only swap exact near-ties).
    assert spearmanr(r.grand, r.el2n).statistic > 1 - 1e-6


def test_cross_fitting_keeps_mislabels_high_under_a_memorising_head() -> None:
    # Few rows, many dimensions, a wide MLP and long training: in-sample the head memorises every label.
    data = two_gaussians(n=300, d=64, seed=1)
    x, y, flipped = data["x"], data["y"], data["flipped"]

    # Premise: the same head trained in-sample drives the flipped rows' EL2N towards zero.
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(mlp(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        in_sample = (torch.softmax(mlp(xt), 1) - F.one_hot(yt, 2).float()).norm(dim=1).numpy()
    assert np.median(in_sample[flipped]) < 0.2

    r = el2n_embedding_scores(x, y, head="mlp", hidden_dim=256, n_seeds=2, epochs=40, score_epoch=40, lr=1e-2)
    assert r.info["head"] == "mlp"
    assert np.median(r.el2n[flipped]) > 1.0
    assert top_share(r.el2n, flipped, 0.15) >= 0.8


def _head_as_module(heads: BatchedHeads, s: int, k: int) -> nn.Sequential:
    d, h, c = heads.w1.shape[0], heads.hidden, heads.n_classes
    mod = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))
    with torch.no_grad():
        mod[0].weight.copy_(heads.w1[:, s, k].T)
        mod[0].bias.copy_(heads.b1[s, k])
        mod[2].weight.copy_(heads.w2[s, k].T)
        mod[2].bias.copy_(heads.b2[s, k])
    return mod


@pytest.mark.parametrize("grand_params", ["all", "last"])
def test_mlp_head_grand_equals_torch_func_gradients(grand_params: str) -> None:
    torch.manual_seed(0)
    heads = BatchedHeads("mlp", n_seeds=2, n_folds=3, dim=7, n_classes=4, hidden=5, init_seeds=[11, 12])
    x = torch.randn(40, 7) * 2
    y = torch.randint(0, 4, (40,))
    with torch.no_grad():
        logits, el2n, grand = heads.score_one(1, 2, x, y, grand_params)
    mod = _head_as_module(heads, 1, 2)
    np.testing.assert_allclose(logits.numpy(), mod(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    ref = per_example_grad_norms(mod, x, y, params=grand_params, chunk_size=16)
    np.testing.assert_allclose(grand.numpy(), ref.numpy(), rtol=1e-4)
    expected_el2n = (torch.softmax(mod(x), 1) - F.one_hot(y, 4).float()).norm(dim=1)
    np.testing.assert_allclose(el2n.numpy(), expected_el2n.detach().numpy(), rtol=1e-5)


def test_string_labels_match_int_labels_and_runs_are_deterministic(blobs: dict[str, np.ndarray]) -> None:
    x, y = blobs["x"][:600], blobs["y"][:600]
    names = np.array(["cat", "dog"])[y]
    a = el2n_embedding_scores(x, y, n_seeds=2, n_folds=3, seed=3)
    b = el2n_embedding_scores(x, names, n_seeds=2, n_folds=3, seed=3)
    c = el2n_embedding_scores(x, y, n_seeds=2, n_folds=3, seed=4)
    np.testing.assert_array_equal(a.el2n, b.el2n)
    np.testing.assert_array_equal(a.grand, b.grand)
    assert not np.array_equal(a.el2n, c.el2n)
    codes, classes = encode_labels(names)
    assert list(classes) == ["cat", "dog"] and np.array_equal(codes, y)


def test_return_aum_does_not_change_el2n(blobs: dict[str, np.ndarray]) -> None:
    x, y = blobs["x"][:600], blobs["y"][:600]
    a = el2n_embedding_scores(x, y, n_seeds=2, n_folds=3, epochs=4, score_epoch=2)
    b = el2n_embedding_scores(x, y, n_seeds=2, n_folds=3, epochs=4, score_epoch=2, return_aum=True)
    assert a.aum is None and b.aum is not None
    np.testing.assert_array_equal(a.el2n, b.el2n)


def test_float16_memmapped_rows_stream_like_preloaded(tmp_path, blobs: dict[str, np.ndarray]) -> None:
    x = blobs["x"][:500].astype(np.float16)
    path = tmp_path / "emb.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    pre = el2n_embedding_scores(mm, blobs["y"][:500], n_seeds=2, n_folds=3)
    streamed = el2n_embedding_scores(mm, blobs["y"][:500], n_seeds=2, n_folds=3, preload_max_bytes=0)
    np.testing.assert_allclose(streamed.el2n, pre.el2n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": np.zeros(100, dtype=int)}, "at least 2 classes"),
        ({"labels": np.arange(99) % 2}, "rows"),
        ({"head": "transformer"}, "head"),
        ({"score_epoch": 11}, "score_epoch"),
        ({"n_folds": 1}, "n_folds"),
        ({"lr": -1.0}, "lr"),
        ({"grand_params": "first"}, "grand_params"),
        ({"emb": np.full((100, 4), np.nan, dtype=np.float32)}, "NaN"),
    ],
)
def test_embedding_mode_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"emb": np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32), "labels": np.arange(100) % 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        el2n_embedding_scores(args.pop("emb"), args.pop("labels"), **args)


# --- model mode ----------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


def loop_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(torch.sqrt(sum((params[n].grad.double() ** 2).sum() for n in names)))
    return torch.stack(out).float()


@pytest.mark.parametrize("params", ["all", "last"])
def test_per_example_grad_norms_equal_a_loop_over_single_examples(params: str) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    model(torch.randn(32, 3, 8, 8) + 0.5)  # non-trivial BatchNorm running statistics
    model.eval()
    x, y = torch.randn(13, 3, 8, 8), torch.randint(0, 3, (13,))
    names = [n for n, _ in model.named_parameters()] if params == "all" else ["fc.weight", "fc.bias"]
    got = per_example_grad_norms(model, x, y, params=params, chunk_size=5)
    ref = loop_grad_norms(model, x, y, names)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5)
    assert not model.training


def test_per_example_grad_norms_restore_train_mode_and_use_running_stats() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    model(torch.randn(32, 3, 8, 8) + 0.5)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    got = per_example_grad_norms(model, x, y)  # called in train mode
    assert model.training
    model.eval()
    ref = loop_grad_norms(model, x, y, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5)


def test_per_example_grad_norms_of_a_linear_model_match_the_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Linear(9, 4)
    x, y = torch.randn(20, 9) * 3, torch.randint(0, 4, (20,))
    got = per_example_grad_norms(model, x, y)
    el2n = (torch.softmax(model(x), 1) - F.one_hot(y, 4).float()).norm(dim=1)
    expected = el2n * torch.sqrt((x ** 2).sum(1) + 1)
    np.testing.assert_allclose(got.numpy(), expected.detach().numpy(), rtol=1e-5)


def test_per_example_grad_norms_reject_unknown_params() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        per_example_grad_norms(nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), params=["nope"])


def test_model_mode_ranks_flipped_labels_high_and_keeps_global_rng() -> None:
    rng = np.random.default_rng(0)
    n, d = 360, 10
    y_true = np.arange(n) % 3
    centers = rng.normal(size=(3, d)) * 3
    x = centers[y_true] + rng.normal(size=(n, d))
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, n // 10, replace=False)] = True
    y = np.where(flipped, (y_true + 1) % 3, y_true)
    ds = torch.utils.data.TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    r = el2n_model_scores(factory, ds, n_seeds=2, epochs=4, batch_size=32, chunk_size=50)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched

    assert r.el2n.shape == r.grand.shape == (n,) and r.aum is not None
    assert top_share(r.el2n, flipped, 0.15) >= 0.8
    assert top_share(r.grand, flipped, 0.15) >= 0.8
    assert top_share(-r.aum, flipped, 0.15) >= 0.8
    assert r.info["n_classes"] == 3 and r.info["grand_params"] == "all"


def test_model_mode_scores_the_score_dataset_and_checks_labels() -> None:
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40) % 3
    train = torch.utils.data.TensorDataset(x + 0.1 * torch.randn_like(x), y)  # "augmented"
    score = torch.utils.data.TensorDataset(x, y)
    r = el2n_model_scores(TinyCNN, train, score_dataset=score, n_seeds=1, epochs=1, batch_size=16,
                          grand_params="last", record_aum=False)
    assert r.aum is None and np.all(np.isfinite(r.grand)) and np.all(r.el2n > 0)
    with pytest.raises(ValueError, match="score_dataset"):
        el2n_model_scores(TinyCNN, train, score_dataset=torch.utils.data.TensorDataset(x[:5], y[:5]))
    bad = torch.utils.data.TensorDataset(x, torch.full((40,), 7))
    with pytest.raises(ValueError, match="labels must be ints"):
        el2n_model_scores(TinyCNN, bad, n_seeds=1, epochs=1)
