"""Coreset reweighting: per-sample training weights learned on a small coreset and propagated to everything.

Method ("The Power of Few: Accelerating and Enhancing Data Reweighting with Coreset Selection", Jafari et al.,
ICASSP 2024; reference code Mohammadjafari80/CW-ERM):

1. pick a small per-class coreset (winnow: ``scorers.select.select(None, rule="moderate", labels=...,
   embeddings=...)``, the Moderate selector the paper uses);
2. learn a weight for every coreset sample with Meta-Weight-Net (Shu et al., NeurIPS 2019): an MLP
   ``loss -> weight`` (1 -> hidden -> 1, sigmoid) trained by one-step look-ahead: a *virtual* SGD step of a
   proxy classifier on the weighted training loss, then the weight net moves to lower the look-ahead model's
   loss on a meta set (:func:`meta_weight_net_weights`);
3. every sample takes the weight of its nearest coreset sample in embedding space (:func:`propagate_weights`,
   FAISS exact search, streamed in chunks), then :func:`normalise_weights` rescales to mean 1 over kept rows.

:func:`coreset_reweight` runs the three steps in one call.

Orientation: **higher weight = the sample counts more in training**. MW-Net's aim is a low weight for a likely
mislabeled sample; note that step 3 copies a weight by embedding position only, so a propagated weight never
looks at the row's own label (benchmarks/results/reweight.md measures what that means under label noise).
Weights reach a training loop through ``pipeline.loader``: either ``weighted_loss`` (Σ wᵢℓᵢ / Σ wᵢ per
batch, so the loss scale does not depend on the weights' scale) or ``weighted_sampler`` (draws ∝ w).

Also the classic coreset weights (the coreset *is* the training set, each element standing for the points it
covers): :func:`k_center_greedy` + :func:`voronoi_cell_sizes` (Sener & Savarese, ICLR 2018) and CRAIG-style
facility location with cluster-size weights (:func:`facility_location`; Mirzasoleiman et al., ICML 2020).
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scorers.arrays import encode_labels, unit_rows
from scorers.device import select_device
from scorers.lazy import lazy_module
from scorers.select import class_median_distance, proportional_budgets, select
from scorers.step import Count, Fraction, Score, ScoringContext, StepOutput, step

# Imported on first use, not when config validation imports this module (scorers/lazy.py).
faiss = lazy_module("faiss")
torch = lazy_module("torch")
nn = lazy_module("torch.nn")
F = lazy_module("torch.nn.functional")

__all__ = [
    "MWNResult",
    "CoresetReweightResult",
    "WeightNet",
    "coreset_reweight",
    "meta_weight_net_weights",
    "propagate_weights",
    "normalise_weights",
    "k_center_greedy",
    "voronoi_cell_sizes",
    "facility_location",
]


def __getattr__(name: str) -> Any:
    """`WeightNet` stays importable from here (PEP 562) without importing torch with this module."""
    if name == "WeightNet":
        from scorers.nets import WeightNet

        return WeightNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def _matrix(name: str, x: Any, *, n: int | None = None, d: int | None = None, check_finite: bool = True) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    if d is not None and a.shape[1] != d:
        raise ValueError(f"{name} has dimension {a.shape[1]}, expected {d}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if check_finite and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _weights_1d(name: str, w: Any, n: int) -> np.ndarray:
    a = np.asarray(w, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if np.any(a < 0):
        raise ValueError(f"{name} has negative entries (first at row {int(np.argmax(a < 0))})")
    return a


def _pos_int(name: str, v: Any, *, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral,)) or int(v) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)




def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)




# ----------------------------------------------------------------------------------------------------------------------
# Meta-Weight-Net
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MWNResult:
    """Outcome of :func:`meta_weight_net_weights`.

    Attributes:
        weights: float64 ``[m]``, one weight in (0, 1) per coreset sample (order of ``coreset_idx``): the trained
            weight net applied to each sample's loss under the final proxy classifier.
        is_meta: bool ``[m]``, True for the held-out meta split (those rows never trained the proxy, so their
            losses, hence weights, are out-of-sample).
        weight_net: the trained :class:`WeightNet` (CPU, eval mode); apply it to any per-sample losses.
        info: JSON-serialisable settings and diagnostics (sizes, steps, meta loss at start/end, seconds).
    """

    weights: np.ndarray
    is_meta: np.ndarray
    weight_net: WeightNet
    info: dict[str, Any] = field(default_factory=dict)


def _wmean(loss_vec: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Σwℓ/Σw (as pipeline.loader.weighted_loss): only relative weights matter, so the meta gradient cannot
    # lower the meta loss by scaling every weight up (a larger effective step), which mean(wℓ) rewards.
    return (w * loss_vec).sum() / w.sum().clamp_min(1e-12)


def _stratified_meta_split(codes: np.ndarray, meta_fraction: float, rng: np.random.Generator,
                           trust: np.ndarray | None) -> np.ndarray:
    """Meta mask: round(meta_fraction · n_c) rows of each class c, at least 1 and at most n_c − 1 (a class of
    one sample stays in the training split): the lowest ``trust`` scores of the class (ties by row), or a
    uniform draw when ``trust`` is None."""
    is_meta = np.zeros(codes.shape[0], dtype=bool)
    for c in np.unique(codes):
        rows = np.flatnonzero(codes == c)
        if rows.shape[0] < 2:
            continue
        k = min(max(int(round(meta_fraction * rows.shape[0])), 1), rows.shape[0] - 1)
        if trust is None:
            is_meta[rng.choice(rows, size=k, replace=False)] = True
        else:
            is_meta[rows[np.lexsort((rows, trust[rows]))[:k]]] = True
    return is_meta


def meta_weight_net_weights(
    emb: np.ndarray,
    labels: np.ndarray,
    coreset_idx: np.ndarray,
    *,
    meta_fraction: float = 0.2,
    meta_split: str = "typical",
    hidden: int = 100,
    epochs: int = 20,
    lr: float = 0.1,
    meta_lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 100,
    meta_batch_size: int = 256,
    model: nn.Module | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> MWNResult:
    """Meta-Weight-Net weights for the coreset rows of ``emb`` (Shu et al. 2019, as used by Jafari et al. 2024).

    The coreset is split, stratified by class, into a training split and a **held-out meta split**
    (``meta_fraction`` of each class). Per training batch:

    1. virtual step: ``θ' = θ − lr_t · ∇_θ Σᵢ V(ℓᵢ) ℓᵢ / Σᵢ V(ℓᵢ)`` (plain SGD, ``torch.func.functional_call`` on
       the proxy's parameters, graph kept so ``θ'`` depends on the weight net ``V``);
    2. meta step: Adam on ``V`` to lower the mean cross-entropy of the look-ahead proxy ``θ'`` on a meta batch;
    3. real step: SGD (momentum, weight decay, cosine lr) on ``Σᵢ V(ℓᵢ) ℓᵢ / Σᵢ V(ℓᵢ)`` with ``V`` fixed.

    The batch loss is normalised by Σw (the MW-Net paper's batch normalisation of weights, and winnow's loader
    convention); with the reference code's ``mean(wℓ)`` the meta gradient mostly learns to scale every weight up
    (a longer look-ahead step), not to rank samples.

    The reference code (CW-ERM, via Meta-Weight-Net_Code-Optimization) draws its meta set from the very coreset it
    reweights, so the weight net is rewarded for weights that fit samples it also trains on; here the meta rows
    never enter the proxy's training loss (and are chosen to be typical of their class, see ``meta_split``).
    The virtual step is plain SGD at the current lr (the reference copies
    the momentum buffers into its virtual optimizer). The meta split carries the same label noise as the
    coreset; with symmetric noise the clean majority still steers ``V`` to down-weight high-loss samples.

    Args:
        emb: ``[n, ...]`` inputs of the proxy: embeddings ``[n, d]`` (embedding mode) or whatever ``model`` takes
            (model mode). Only the ``coreset_idx`` rows are read.
        labels: ``[n]`` class labels (ints or strings).
        coreset_idx: indices of the coreset rows (unique).
        meta_fraction: share of each class held out as the meta set, in (0, 1).
        meta_split: ``"typical"`` (default): per class, the coreset rows nearest the class's median embedding
            (Moderate's score, ``scorers.select.class_median_distance``) form the meta split; ``"random"``: a
            uniform stratified draw. Why: MW-Net needs a (mostly) clean meta set; with a noisy one, cross-entropy
            on the meta set rewards *less* confident models, and the weight net learns to up-weight high-loss
            (mislabeled) samples as a form of label smoothing (seen here with 30 % flipped labels and a random
            meta split). A mislabeled sample sits far from its (wrong) class's median, so it rarely lands in the
            typical split.
        hidden: weight-net width (the paper's 100).
        epochs: passes over the training split.
        lr: proxy SGD learning rate (cosine-annealed); the virtual step uses the current value.
        meta_lr: Adam learning rate of the weight net.
        model: proxy classifier in model mode (copied, not modified); default a linear head ``d -> n_classes``.
        seed: split, initialisation and batch order.
        device: "cpu", "cuda", "cuda:N" or "auto" (``scorers.device.select_device``).

    Returns:
        :class:`MWNResult` with one weight per coreset row, in ``coreset_idx`` order.
    """
    from scorers.nets import WeightNet  # here, not at the top: it imports torch
    t0 = time.perf_counter()
    x_all = np.asarray(emb)
    if x_all.ndim < 2:
        raise ValueError(f"emb must be at least 2-D [n, ...], got shape {x_all.shape}")
    n = x_all.shape[0]
    idx = np.asarray(coreset_idx)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"coreset_idx must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.size < 2 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"coreset_idx must hold >= 2 indices in [0, {n}), got {idx.size} in "
                         f"[{idx.min() if idx.size else '-'}, {idx.max() if idx.size else '-'}]")
    if np.unique(idx).size != idx.size:
        raise ValueError("coreset_idx has duplicate indices")
    if not 0 < meta_fraction < 1:
        raise ValueError(f"meta_fraction must be in (0, 1), got {meta_fraction}")
    for name, v in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size),
                    ("meta_batch_size", meta_batch_size)):
        _pos_int(name, v)
    for name, v in (("lr", lr), ("meta_lr", meta_lr)):
        if not (isinstance(v, numbers.Real) and v > 0):
            raise ValueError(f"{name} must be > 0, got {v!r}")
    codes_all, classes = encode_labels(labels, n, name="labels")
    x = np.asarray(x_all[idx], dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("emb has NaN or inf in coreset rows")
    codes = codes_all[idx]
    n_classes = int(classes.shape[0])
    rng = np.random.default_rng(seed)
    if meta_split == "random":
        trust = None
    elif meta_split == "typical":
        if x.ndim != 2:
            raise ValueError("meta_split='typical' needs 2-D embeddings; use meta_split='random' in model mode "
                             "with image inputs")
        trust = class_median_distance(x, codes)
    else:
        raise ValueError(f"meta_split must be 'typical' or 'random', got {meta_split!r}")
    is_meta = _stratified_meta_split(codes, meta_fraction, rng, trust)
    if not is_meta.any() or is_meta.all():
        raise ValueError("the coreset is too small for a meta split: every class has a single sample")

    dev = select_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    proxy = copy.deepcopy(model) if model is not None else nn.Linear(x.shape[1] if x.ndim == 2 else
                                                                     int(np.prod(x.shape[1:])), n_classes)
    if model is None and x.ndim != 2:
        proxy = nn.Sequential(nn.Flatten(), proxy)
    proxy = proxy.to(dev).train()
    wnet = WeightNet(hidden).to(dev).train()

    xt = torch.from_numpy(x).to(dev)
    yt = torch.from_numpy(codes).to(dev)
    tr = torch.from_numpy(np.flatnonzero(~is_meta)).to(dev)
    me = torch.from_numpy(np.flatnonzero(is_meta)).to(dev)
    n_tr = int(tr.shape[0])
    steps_per_epoch = math.ceil(n_tr / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(proxy.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=meta_lr)
    names = [k for k, _ in proxy.named_parameters()]

    def meta_loss_full() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(proxy(xt[me]), yt[me]))

    meta_loss_start = meta_loss_full()
    meta_perm = me[torch.randperm(me.shape[0], generator=gen).to(dev)]
    meta_pos = 0
    for _ in range(epochs):
        order = tr[torch.randperm(n_tr, generator=gen).to(dev)]
        for b in range(0, n_tr, batch_size):
            ib = order[b:b + batch_size]
            xb, yb = xt[ib], yt[ib]
            # 1. virtual SGD step, differentiable w.r.t. the weight net.
            params = dict(proxy.named_parameters())
            loss_vec = F.cross_entropy(torch.func.functional_call(proxy, params, (xb,)), yb, reduction="none")
            w = wnet(loss_vec.detach().unsqueeze(1)).squeeze(1)
            grads = torch.autograd.grad(_wmean(loss_vec, w), [params[k] for k in names], create_graph=True)
            cur_lr = opt.param_groups[0]["lr"]
            look_ahead = {k: params[k] - cur_lr * g for k, g in zip(names, grads)}
            # 2. meta step on a batch of the held-out meta split (cycled).
            if meta_pos + meta_batch_size > meta_perm.shape[0]:
                meta_perm = me[torch.randperm(me.shape[0], generator=gen).to(dev)]
                meta_pos = 0
            im = meta_perm[meta_pos:meta_pos + meta_batch_size]
            meta_pos += meta_batch_size
            meta_loss = F.cross_entropy(torch.func.functional_call(proxy, look_ahead, (xt[im],)), yt[im])
            meta_grads = torch.autograd.grad(meta_loss, list(wnet.parameters()))
            meta_opt.zero_grad(set_to_none=True)
            for p_, g_ in zip(wnet.parameters(), meta_grads):
                p_.grad = g_
            meta_opt.step()
            # 3. real step with the updated weight net's (fixed) weights.
            loss_vec = F.cross_entropy(proxy(xb), yb, reduction="none")
            with torch.no_grad():
                w = wnet(loss_vec.detach().unsqueeze(1)).squeeze(1)
            opt.zero_grad(set_to_none=True)
            _wmean(loss_vec, w).backward()
            opt.step()
            sched.step()

    proxy.eval()
    wnet.eval()
    with torch.no_grad():
        losses = torch.cat([F.cross_entropy(proxy(xt[s:s + 4096]), yt[s:s + 4096], reduction="none")
                            for s in range(0, xt.shape[0], 4096)])
        weights = wnet(losses.unsqueeze(1)).squeeze(1).double().cpu().numpy()
    info = {
        "method": "Meta-Weight-Net (Shu et al. 2019) on a coreset (Jafari et al. 2024)",
        "mode": "model" if model is not None else "embedding (linear head)",
        "n_coreset": int(idx.size), "n_train": n_tr, "n_meta": int(is_meta.sum()), "n_classes": n_classes,
        "meta_fraction": meta_fraction, "meta_split": meta_split, "hidden": hidden, "epochs": epochs,
        "steps": total, "lr": lr, "meta_lr": meta_lr, "batch_size": batch_size, "meta_batch_size": meta_batch_size, "seed": seed,
        "device": str(dev), "meta_loss_start": round(meta_loss_start, 5), "meta_loss_end": round(meta_loss_full(), 5),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return MWNResult(weights=weights, is_meta=is_meta, weight_net=wnet.cpu(), info=info)


# ----------------------------------------------------------------------------------------------------------------------
# Propagation and normalisation
# ----------------------------------------------------------------------------------------------------------------------


def _knn_average(dist_sq: np.ndarray, nbr: np.ndarray, cw: np.ndarray) -> np.ndarray:
    """Inverse-distance average of the neighbours' weights; a row with exact matches (distance 0) takes the mean
    weight of those matches (the limit of 1/d weighting)."""
    if nbr.shape[1] == 1:
        return cw[nbr[:, 0]]
    d = np.sqrt(np.maximum(dist_sq.astype(np.float64), 0.0))
    vals = cw[nbr]
    zero = d == 0
    inv = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, d))
    avg = (inv * vals).sum(1) / np.maximum(inv.sum(1), np.finfo(np.float64).tiny)
    has_zero = zero.any(1)
    if has_zero.any():
        avg[has_zero] = (zero[has_zero] * vals[has_zero]).sum(1) / zero[has_zero].sum(1)
    return avg


def propagate_weights(
    emb: np.ndarray,
    coreset_emb: np.ndarray,
    coreset_weights: np.ndarray,
    *,
    k: int = 1,
    same_class: bool = False,
    labels: np.ndarray | None = None,
    coreset_labels: np.ndarray | None = None,
    cosine: bool = False,
    chunk: int = 65536,
) -> np.ndarray:
    """Each row of ``emb`` takes the weight of its nearest coreset row (Jafari et al. 2024, step 3).

    Exact Euclidean search (``faiss.IndexFlatL2`` over the coreset), streamed over ``emb`` in blocks of ``chunk``
    rows, so ``emb`` may be a ``np.memmap`` larger than memory. With ``k > 1`` the weight is the inverse-distance
    average ``Σⱼ wⱼ/dⱼ / Σⱼ 1/dⱼ`` over the ``k`` nearest coreset rows (``dⱼ`` Euclidean; a row at distance 0 from
    some of them takes their mean weight). With ``same_class=True`` neighbours are searched only among coreset
    rows of the row's own label (every label in ``labels`` must occur in ``coreset_labels``).
    ``cosine=True`` L2-normalises the coreset and each streamed block first (cosine neighbours; distances are then
    chord lengths ``√(2 − 2 cos)``), so a raw memory-mapped store needs no normalised copy.

    Returns:
        float64 ``[n]``, not yet normalised (see :func:`normalise_weights`).
    """
    cemb = _f32(_matrix("coreset_emb", coreset_emb))
    prep = unit_rows if cosine else _f32
    cemb = prep(cemb)
    m, d = cemb.shape
    if m == 0:
        raise ValueError("coreset_emb is empty")
    cw = _weights_1d("coreset_weights", coreset_weights, m)
    k = _pos_int("k", k)
    chunk = _pos_int("chunk", chunk)
    x = np.asarray(emb) if not isinstance(emb, np.ndarray) else emb
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"emb must be [n, {d}] (the coreset's dimension), got shape {x.shape}")
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)

    if not same_class:
        index = faiss.IndexFlatL2(d)
        index.add(cemb)
        kk = min(k, m)
        for s in range(0, n, chunk):
            block = prep(x[s:s + chunk])
            if not np.all(np.isfinite(block)):
                raise ValueError(f"emb contains NaN or inf in rows [{s}, {s + block.shape[0]})")
            dist, nbr = index.search(block, kk)
            out[s:s + block.shape[0]] = _knn_average(dist, nbr, cw)
        return out

    if labels is None or coreset_labels is None:
        raise ValueError("same_class=True needs labels= and coreset_labels=")
    ccodes, classes = encode_labels(coreset_labels, m, name="coreset_labels")
    codes, _ = encode_labels(labels, n, name="labels", classes=classes)
    if np.any(codes < 0):
        missing = np.unique(np.asarray(labels)[codes < 0])[:5]
        raise ValueError(f"labels {missing.tolist()} have no coreset sample; same_class propagation needs one per "
                         "label (or use same_class=False)")
    per_class = []
    for c in range(classes.shape[0]):
        rows = np.flatnonzero(ccodes == c)
        index = faiss.IndexFlatL2(d)
        index.add(cemb[rows])
        per_class.append((index, rows, min(k, rows.shape[0])))
    for s in range(0, n, chunk):
        block = prep(x[s:s + chunk])
        if not np.all(np.isfinite(block)):
            raise ValueError(f"emb contains NaN or inf in rows [{s}, {s + block.shape[0]})")
        bc = codes[s:s + block.shape[0]]
        for c in np.unique(bc):
            sel = np.flatnonzero(bc == c)
            index, rows, kk = per_class[c]
            dist, nbr = index.search(np.ascontiguousarray(block[sel]), kk)
            out[s + sel] = _knn_average(dist, nbr, cw[rows])
    return out


def normalise_weights(w: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Rescale to mean 1 over the kept rows, 0 elsewhere (``keep=None``: every row is kept).

    Mean 1 makes ``Σ wᵢℓᵢ / n`` and ``Σ wᵢℓᵢ / Σ wᵢ`` agree over the whole kept set and keeps a sampler's expected
    epoch length; the weighted loss in ``pipeline.loader`` divides by Σw per batch regardless.
    """
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"w must be 1-D, got shape {a.shape}")
    a = _weights_1d("w", a, a.shape[0])
    mask = np.ones(a.shape[0], dtype=bool) if keep is None else np.asarray(keep)
    if mask.shape != a.shape or mask.dtype != bool:
        raise ValueError(f"keep must be a bool array of shape {a.shape}, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("keep selects no rows")
    mean = a[mask].mean()
    if mean <= 0:
        raise ValueError("weights of the kept rows are all zero; cannot normalise to mean 1")
    out = np.zeros_like(a)
    out[mask] = a[mask] / mean
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Classic coreset weights
# ----------------------------------------------------------------------------------------------------------------------


def _sq_dist_to(x: np.ndarray, sq_norms: np.ndarray, c: np.ndarray, chunk: int) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.float64)
    cc = float(np.dot(c, c))
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = sq_norms[s:s + chunk] - 2.0 * (x[s:s + chunk] @ c) + cc
    return np.maximum(out, 0.0)


def k_center_greedy(emb: np.ndarray, budget: int, *, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """Greedy k-center (Sener & Savarese, ICLR 2018, "core-set" active learning): start from a random row, then
    repeatedly add the row farthest (Euclidean) from every chosen centre. A 2-approximation of the minimax cover.

    Returns:
        int64 ``[budget]`` row indices in the order chosen (ties: lowest index).
    """
    x = _f32(_matrix("emb", emb))
    n = x.shape[0]
    budget = _pos_int("budget", budget)
    if budget > n:
        raise ValueError(f"budget must be in [1, n={n}], got {budget}")
    chunk = _pos_int("chunk", chunk)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    min_d = _sq_dist_to(x, sq, x[chosen[0]], chunk)
    min_d[chosen[0]] = -1.0
    for _ in range(budget - 1):
        j = int(np.argmax(min_d))
        chosen.append(j)
        min_d = np.minimum(min_d, _sq_dist_to(x, sq, x[j], chunk))
        min_d[chosen] = -1.0  # chosen rows never win again, even when duplicates tie at distance 0
    return np.asarray(chosen, dtype=np.int64)


def voronoi_cell_sizes(emb: np.ndarray, centres_idx: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """Weight of each centre = number of rows whose nearest centre (Euclidean, exact) it is; sums to n.

    Returns float64 ``[len(centres_idx)]`` in ``centres_idx`` order.
    """
    x = _matrix("emb", emb)
    n, d = x.shape
    c_idx = np.asarray(centres_idx)
    if c_idx.ndim != 1 or c_idx.size == 0 or c_idx.dtype.kind not in "iu":
        raise ValueError(f"centres_idx must be a non-empty 1-D integer array, got shape {c_idx.shape}")
    if c_idx.min() < 0 or c_idx.max() >= n:
        raise ValueError(f"centres_idx must lie in [0, {n})")
    index = faiss.IndexFlatL2(d)
    index.add(_f32(x[c_idx]))
    counts = np.zeros(c_idx.size, dtype=np.int64)
    for s in range(0, n, _pos_int("chunk", chunk)):
        _, nbr = index.search(_f32(x[s:s + chunk]), 1)
        counts += np.bincount(nbr[:, 0], minlength=c_idx.size)
    return counts.astype(np.float64)


def _facility_location_group(u: np.ndarray, k: int, batch: int, max_dense: int) -> np.ndarray:
    """Lazy greedy maximisation of F(S) = Σᵢ maxⱼ∈S (1 + uᵢ·uⱼ) on unit rows ``u``; returns local indices.

    Groups of at most ``max_dense`` rows keep the similarity matrix (m² float32), so re-evaluating a candidate
    costs O(m); larger groups recompute similarities, O(md) per candidate."""
    m = u.shape[0]
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    dense = (1.0 + u @ u.T) if m <= max_dense else None

    def sims(cols: np.ndarray) -> np.ndarray:
        return dense[:, cols] if dense is not None else 1.0 + u @ u[cols].T

    cur = np.zeros(m, dtype=np.float32)  # best similarity to the chosen set so far (0 = empty set)
    # With S empty the gain of j is Σᵢ (1 + uᵢ·uⱼ) = m + uⱼ·Σᵢuᵢ: exact first bounds in O(md), not O(m²d).
    ub = m + (u @ u.sum(0, dtype=np.float64).astype(np.float32)).astype(np.float64)
    fresh = np.ones(m, dtype=bool)
    chosen: list[int] = []
    b = min(batch, m)
    while len(chosen) < k:
        j = int(np.argmax(ub))
        if not fresh[j]:
            # Re-evaluate the top-b stale bounds in one product (submodularity keeps the other bounds valid);
            # b doubles on every miss, so flat gain landscapes cost O(log m) rounds, not O(m / batch).
            top = np.append(np.argpartition(-ub, b - 1)[:b], j)  # j itself always (ties at the cut)
            top = np.unique(top[~fresh[top] & np.isfinite(ub[top])])
            ub[top] = np.maximum(sims(top) - cur[:, None], 0.0).sum(0, dtype=np.float64)
            fresh[top] = True
            b = min(2 * b, m)
            continue
        chosen.append(j)
        cur = np.maximum(cur, sims(np.array([j]))[:, 0])
        ub[j] = -np.inf
        fresh[:] = False
        fresh[j] = True
        b = min(batch, m)
    return np.asarray(chosen, dtype=np.int64)


def facility_location(
    emb: np.ndarray,
    budget: int,
    *,
    labels: np.ndarray | None = None,
    batch: int = 16,
    max_dense: int = 8192,
    chunk: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """CRAIG-style coreset (Mirzasoleiman, Bilmes & Leskovec, ICML 2020): greedy facility location with
    cluster-size weights.

    Maximises ``F(S) = Σᵢ max_{j∈S} sim(i, j)`` with ``sim = 1 + cos`` (in [0, 2]) on L2-normalised rows by lazy
    greedy (stale upper bounds, re-evaluated ``batch`` at a time, doubling on a miss); the (1 − 1/e) guarantee
    of greedy holds. CRAIG uses ``const − distance``; ``1 + cos`` makes the first round's gains exact in O(nd).
    A group (a class, or everything) of at most ``max_dense`` rows keeps its m×m similarity matrix (8192 rows =
    256 MiB), so a re-evaluation costs O(m); a larger group recomputes similarities, O(md) per candidate, and in
    the worst case (no cluster structure) re-evaluates every candidate at every pick — pass ``labels`` so groups
    stay small (50k rows over 10 classes: 5k per class, dense). With ``labels`` the budget is split over classes in proportion to their sizes
    (largest remainder) and each class is solved on its own, as CRAIG does for classification.

    Returns:
        ``(idx, weights)``: int64 selected rows (per class, in greedy order) and float64 weights = the number of
        rows (of the same class, with labels) whose most similar selected row each one is; weights sum to n.
    """
    x = _matrix("emb", emb)
    n, d = x.shape
    budget = _pos_int("budget", budget)
    if budget > n:
        raise ValueError(f"budget must be in [1, n={n}], got {budget}")
    batch = _pos_int("batch", batch)
    chunk = _pos_int("chunk", chunk)
    u = unit_rows(x)
    if labels is None:
        groups = [np.arange(n)]
        budgets = np.array([budget])
    else:
        codes, classes = encode_labels(labels, n, name="labels")
        groups = [np.flatnonzero(codes == c) for c in range(classes.shape[0])]
        budgets = proportional_budgets(np.array([g.size for g in groups]), budget)
    idx_parts, w_parts = [], []
    for rows, k in zip(groups, budgets):
        k = int(k)
        if k == 0:
            continue
        g = np.ascontiguousarray(u[rows])
        local = _facility_location_group(g, k, batch, _pos_int("max_dense", max_dense, low=0))
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(g[local]))
        counts = np.zeros(k, dtype=np.int64)
        for s in range(0, g.shape[0], chunk):
            _, nbr = index.search(g[s:s + chunk], 1)
            counts += np.bincount(nbr[:, 0], minlength=k)
        if counts.sum() != rows.size:
            raise AssertionError("facility-location weights must cover every row")
        idx_parts.append(rows[local])
        w_parts.append(counts.astype(np.float64))
    idx = np.concatenate(idx_parts)
    weights = np.concatenate(w_parts)
    if labels is not None and weights.sum() != n:
        # A class whose budget rounded to 0 has no representative: its rows are not covered.
        raise ValueError(f"budget {budget} leaves some class without a selected row; raise the budget or pass "
                         "labels=None")
    return idx, weights


# ----------------------------------------------------------------------------------------------------------------------
# The whole method in one call
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoresetReweightResult:
    """Outcome of :func:`coreset_reweight`.

    Attributes:
        weights: float64 ``[n]``, mean 1 over the kept rows, 0 elsewhere (the manifest's ``weight``).
        coreset_idx: int64 rows of the Moderate coreset (ascending).
        coreset_weights: float64 raw MW-Net weights in (0, 1) of those rows (``score_coreset_weight`` material).
        info: JSON-serialisable: the selection's ``why``, MW-Net's info, propagation settings, seconds per stage.
    """

    weights: np.ndarray
    coreset_idx: np.ndarray
    coreset_weights: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def coreset_reweight(
    emb: np.ndarray,
    labels: np.ndarray,
    *,
    coreset_fraction: float = 0.05,
    keep: np.ndarray | None = None,
    k: int = 1,
    same_class: bool = False,
    seed: int = 0,
    device: str = "cpu",
    **mwn_knobs: Any,
) -> CoresetReweightResult:
    """"The Power of Few" end to end (Jafari et al. 2024): Moderate coreset -> Meta-Weight-Net -> propagation.

    1. ``scorers.select.select(None, rule="moderate", keep_fraction=coreset_fraction, labels=labels,
       embeddings=<L2-normalised emb>)`` (per class, among the ``keep`` rows when given);
    2. :func:`meta_weight_net_weights` on the coreset rows, standardised per dimension (mean 0, std 1 over the
       coreset) so a linear proxy head trains at a usual learning rate; ``mwn_knobs`` go to it;
    3. :func:`propagate_weights` with cosine neighbours (``k``, ``same_class``), then :func:`normalise_weights`.

    Orientation: higher weight = counts more in training. Rows outside ``keep`` get weight 0.
    """
    t0 = time.perf_counter()
    x = _matrix("emb", emb)
    n = x.shape[0]
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {y.shape}")
    kept = np.ones(n, dtype=bool) if keep is None else np.asarray(keep)
    if kept.shape != (n,) or kept.dtype != bool:
        raise ValueError(f"keep must be a bool array of shape ({n},)")
    if not 0 < coreset_fraction <= 1:
        raise ValueError(f"coreset_fraction must be in (0, 1], got {coreset_fraction}")
    rows = np.flatnonzero(kept)
    unit = unit_rows(x)
    sel = select(None, keep_fraction=coreset_fraction, rule="moderate", labels=y[rows], embeddings=unit[rows],
                 seed=seed)
    core = rows[np.flatnonzero(sel.keep)]
    t1 = time.perf_counter()
    xc = x[core].astype(np.float32)
    xc = (xc - xc.mean(0)) / (xc.std(0) + 1e-6)
    mwn = meta_weight_net_weights(xc, y[core], np.arange(core.size), seed=seed, device=device, **mwn_knobs)
    t2 = time.perf_counter()
    raw = np.zeros(n)
    raw[rows] = propagate_weights(unit[rows], unit[core], mwn.weights, k=k, same_class=same_class,
                                  labels=y[rows] if same_class else None,
                                  coreset_labels=y[core] if same_class else None)
    weights = normalise_weights(raw, kept)
    info = {
        "method": "coreset reweighting (Jafari et al., ICASSP 2024): Moderate coreset, Meta-Weight-Net, 1-NN propagation",
        "coreset": {"fraction": coreset_fraction, "size": int(core.size), "why": sel.why},
        "mwn": mwn.info,
        "propagation": {"k": k, "same_class": same_class, "metric": "cosine"},
        "normalisation": "mean 1 over kept rows; train with Σwℓ/Σw (pipeline.loader.weighted_loss) or the sampler",
        "seconds": {"coreset": round(t1 - t0, 3), "mwn": round(t2 - t1, 3),
                    "propagate": round(time.perf_counter() - t2, 3)},
    }
    return CoresetReweightResult(weights=weights, coreset_idx=core, coreset_weights=mwn.weights, info=info)


# ---- the curate step --------------------------------------------------------------------------------------------------


@step("coreset_weight", reason=None, needs=("labels",),
      scores=(Score("score_coreset_weight", higher="counts more in training"),),
      orientation="score_coreset_weight: propagated Meta-Weight-Net weight, mean 1 over kept rows; higher = counts more")
def step_coreset_weight(
    ctx: ScoringContext, *, coreset_fraction: Fraction = 0.05, k: Count = 1, same_class: bool = False, seed: int | None = None
) -> StepOutput:
    """Coreset reweighting, "The Power of Few" (Jafari et al. ICASSP 2024), over the rows still alive.

    Per-class Moderate coreset → Meta-Weight-Net on it (with a held-out meta split) → every row takes the weight
    of its nearest coreset row (k > 1: distance-weighted average). Drops nothing; fills the manifest's `weight`
    (mean 1 over kept rows; train with Σwℓ/Σw or the weighted sampler). score_coreset_weight: higher = counts more.
    """
    result = coreset_reweight(ctx.emb, ctx.labels, coreset_fraction=coreset_fraction, keep=ctx.alive.copy(), k=k,
                              same_class=same_class, seed=ctx.seed if seed is None else seed, device=ctx.device)
    score = np.where(ctx.alive, result.weights, np.nan).astype(np.float32)
    return StepOutput(scores={"score_coreset_weight": score}, weights=result.weights, info=result.info)
