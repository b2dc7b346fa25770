"""EL2N and GraNd scores (Paul, Ganguli & Dziugaite, NeurIPS 2021, "Deep Learning on a Data Diet:
Finding Important Examples Early in Training"; reference code mansheej/data_diet).

For a sample ``(x, y)`` and a network ``f`` early in training:

- **EL2N** = ``E_seeds ‖softmax(f(x)) − onehot(y)‖₂`` (the paper scores at epoch 20 of 200, 10 seeds,
  eval mode, no augmentation);
- **GraNd** = ``E_seeds ‖∇_w ℓ(f(x), y)‖₂`` with ``ℓ`` the cross-entropy of that one sample.

Orientation: **higher = harder** (more error / more gradient), i.e. more worth keeping under a
keep-hardest rule. Mislabeled samples also score high, which is why the selectors in
:mod:`scorers.select` offer CCS (cut the very hardest first) at low keep fractions.

Two modes:

**Embedding mode** (:func:`el2n_embedding_scores`): proxy heads (linear, or a one-hidden-layer MLP) on
fixed embeddings, ``n_seeds`` seeds × ``n_folds`` stratified folds trained together as one batched model.
Every score is *out-of-fold*: the head that scores a row never trained on it (k-fold cross-fitting), so
a head that memorises its training rows cannot drive their scores to zero. Each seed draws its own fold
split and initialisation (one shuffle order per epoch is shared by all heads, so a single GEMM serves
them all); scores are averaged over seeds.
For a **linear head** ``logits = W h + b`` the per-sample gradient of the cross-entropy is
``∇_W = (p − y) hᵀ``, ``∇_b = p − y``, so GraNd = ``‖p − y‖ · √(‖h‖² + 1)`` = EL2N · √(‖h‖² + 1)
*exactly* (per seed, hence also in the seed mean). On L2-normalised embeddings ``‖h‖ = 1`` and GraNd is
EL2N × √2: **the two rank identically**; they are reported separately only for the manifest's sake.
For the **MLP head** GraNd is the true per-sample gradient norm over the head's parameters (all of them,
or the last layer with ``grand_params="last"``), computed in closed form from the forward pass (checked
against :func:`per_example_grad_norms` in the tests), so it does differ from EL2N.

**Model mode** (:func:`el2n_model_scores`): the user supplies a model factory and a dataset; each seed
trains a fresh model for ``epochs`` epochs at a fixed learning rate (the "early in training" point of a
longer schedule), then scores EL2N and GraNd in eval mode, the gradients computed per sample with
``torch.func`` (``vmap(grad(loss))`` over ``functional_call``), chunked — each sample's own loss, never a
``reduction='mean'`` batch loss rescaled.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence, get_args

import numpy as np
from pydantic import Field

from scorers.arrays import encode_labels
from scorers.device import select_device
from scorers.lazy import lazy_module
from scorers.select import RULES
from scorers.step import Count, Fraction, Score, ScoringContext, StepOutput, budget_for, rule_knobs, scatter, select_among_alive, step

# Imported on first use, not when config validation imports this module (scorers/lazy.py).
torch = lazy_module("torch")
nn = lazy_module("torch.nn")
F = lazy_module("torch.nn.functional")

__all__ = [
    "EL2NResult",
    "el2n_embedding_scores",
    "el2n_model_scores",
    "per_example_grad_norms",
    "encode_labels",
    "margins",
]

Head = Literal["linear", "mlp"]
HEADS: tuple[str, ...] = get_args(Head)
GRAND_PARAMS = ("all", "last")


@dataclass(frozen=True)
class EL2NResult:
    """Scores of one EL2N run, row-aligned with the input.

    Attributes:
        el2n: float32 ``[n]``, mean over seeds of ``‖softmax − onehot‖₂``; higher = harder.
        grand: float32 ``[n]``, mean over seeds of the per-sample gradient norm; higher = harder.
        aum: float32 ``[n]`` area under the margin (low = likely mislabeled) when requested, else None.
        info: settings and diagnostics (JSON-serialisable) for the run's ``run.json``.
    """

    el2n: np.ndarray
    grand: np.ndarray
    aum: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    probs: np.ndarray | None = None  # float32 [n, classes] out-of-fold softmax after the last epoch (return_probs)
    classes: np.ndarray | None = None  # the label of each probs column (sorted unique labels)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row margin: ``logits[i, y_i] - max_{c != y_i} logits[i, c]`` (torch, any device).

    ``logits`` is ``[n, classes]`` with ``classes >= 2``; ``labels`` holds ints in ``[0, classes)``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [n, classes>=2], got shape {tuple(logits.shape)}")
    assigned = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    # Mask the assigned class with -inf so the max runs over the other classes only.
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    return assigned - other




def _seed_ints(seed: int, *keys: int) -> list[int]:
    """Independent 31-bit seeds derived from (seed, *keys)."""
    return [int(v) & 0x7FFFFFFF for v in np.random.SeedSequence([seed, *keys]).generate_state(4)]


def _stratified_folds(codes: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per row: members of each class shuffled, then dealt round-robin from a random start."""
    n = codes.shape[0]
    order = np.lexsort((rng.random(n), codes))  # by class, random within class
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, np.arange(int(codes.max()) + 1))
    rank = np.arange(n) - starts[sorted_codes]
    offset = rng.integers(0, n_folds, size=starts.shape[0])  # balances fold sizes across classes
    folds = np.empty(n, dtype=np.int64)
    folds[order] = (rank + offset[sorted_codes]) % n_folds
    return folds


class _RowSource:
    """Rows of the embedding matrix as float32 tensors on the device.

    Small enough matrices are converted once (zero-copy for float32 on CPU); larger ones (memory-mapped
    stores) are gathered batch by batch.
    """

    def __init__(self, emb: np.ndarray, device: torch.device, preload_max_bytes: int) -> None:
        self.n, self.d = emb.shape
        self.device = device
        self.tensor: torch.Tensor | None = None
        self.array = emb
        if self.n * self.d * 4 <= preload_max_bytes:
            self.tensor = torch.as_tensor(np.asarray(emb, dtype=np.float32)).to(device)
            if not bool(torch.isfinite(self.tensor).all()):
                raise ValueError("emb contains NaN or inf")

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[idx]
        flat = idx.reshape(-1).cpu().numpy()
        rows = torch.from_numpy(np.asarray(self.array[flat], dtype=np.float32))
        return rows.to(self.device).view(*idx.shape, self.d)


def el2n_embedding_scores(
    emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    *,
    head: str = "linear",
    hidden_dim: int = 128,
    n_seeds: int = 5,
    n_folds: int = 5,
    epochs: int = 10,
    score_epoch: int = 2,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    grand_params: str = "all",
    return_aum: bool = False,
    return_probs: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    preload_max_bytes: int = 8 << 30,
) -> EL2NResult:
    """EL2N and GraNd of every row from out-of-fold proxy heads on embeddings (Paul et al. 2021).

    For each of ``n_seeds`` seeds the rows are split into ``n_folds`` folds stratified by label; one head
    per fold trains (Adam, constant ``lr``, cross-entropy, mini-batches of ``batch_size``) on the other
    folds, and after ``score_epoch`` epochs scores its held-out fold. All ``n_seeds × n_folds`` heads train
    together as one batched model. Scores are averaged over seeds, so each row's score is the mean of
    ``n_seeds`` predictions by heads that never saw it.

    Args:
        emb: ``[n, d]`` embeddings (float16/float32; a memory-mapped array is read batch by batch when it
            exceeds ``preload_max_bytes`` as float32).
        labels: ``[n]`` labels, ints or strings; mapped to contiguous ints. At least 2 classes.
        head: ``"linear"`` or ``"mlp"`` (one hidden ReLU layer of ``hidden_dim`` units).
        n_seeds, n_folds: seeds (paper: 10 networks) and cross-fitting folds (≥ 2).
        epochs: training length; AUM (``return_aum=True``) averages the out-of-fold margin over all of
            these epochs. Without AUM training stops at ``score_epoch`` (same scores, less time).
        score_epoch: epoch (1-based, ≤ ``epochs``) after which EL2N/GraNd are scored — early, as in the paper.
        lr, weight_decay, batch_size: Adam settings (constant learning rate); ``batch_size=None`` picks
            ``min(1024, max(32, n // 50))``.
        grand_params: for the MLP head, ``"all"`` head parameters or the ``"last"`` layer only (the linear
            head has one layer, so both are the same).
        return_aum: also compute AUM (Pleiss et al. 2020) from the same run, out-of-fold.
        return_probs: also return the out-of-fold predicted probabilities after the last epoch (``epochs``),
            averaged over seeds: the input cleanlab's confident learning expects (``scorers.label_issues``).
        device: ``"cpu"``, ``"cuda"``, a torch device, or ``"auto"``.
        seed: seeds the folds, inits and shuffles; same seed → same scores on the same device/threads.

    Returns:
        :class:`EL2NResult`. Orientation: EL2N and GraNd **higher = harder**; AUM **lower = harder**.
        With the linear head, GraNd == EL2N·√(‖h‖²+1) exactly, so on unit-norm embeddings GraNd and EL2N
        rank the rows identically.

    Defaults (Adam, lr 1e-2, batch ``min(1024, max(32, n // 50))``, score after epoch 2 of 10) were set on
    Fashion-MNIST pixels (centred, unit-normalised, 50k rows, 10% labels flipped): out-of-fold EL2N put
    ~81% of the flipped rows in its top 10% (the ceiling is 100%); scoring later (epoch 8) or with lr 1e-3
    did not do better, and AUM from the same run reached ~87%.

    Cost: per epoch one pass over the data through all ``n_seeds × n_folds`` heads (one GEMM per batch)
    plus, at scoring, ``n_seeds`` passes through one head each. 50k × 512 with the defaults: a few
    seconds on 2 CPU cores.
    """
    from scorers.nets import BatchedHeads  # here, not at the top: it imports torch
    t0 = time.perf_counter()
    x_arr = emb if isinstance(emb, np.ndarray) else np.asarray(emb)
    if x_arr.ndim != 2:
        raise ValueError(f"emb must be a 2-D array [n, d], got shape {x_arr.shape}")
    n, dim = x_arr.shape
    codes, classes = encode_labels(labels)
    if codes.shape[0] != n:
        raise ValueError(f"labels has {codes.shape[0]} rows but emb has {n}")
    n_classes = int(classes.shape[0])
    if n_classes < 2:
        raise ValueError(f"EL2N needs at least 2 classes, labels have {n_classes}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if grand_params not in GRAND_PARAMS:
        raise ValueError(f"grand_params must be one of {GRAND_PARAMS}, got {grand_params!r}")
    if batch_size is None:
        # ~50+ optimizer steps per epoch on small sets, batches of 1024 on large ones.
        batch_size = min(1024, max(32, n // 50))
    for name, value, low in (("n_seeds", n_seeds, 1), ("n_folds", n_folds, 2), ("epochs", epochs, 1),
                             ("batch_size", batch_size, 1), ("hidden_dim", hidden_dim, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 1 <= score_epoch <= epochs:
        raise ValueError(f"score_epoch must be in [1, epochs={epochs}], got {score_epoch}")
    if n < n_folds:
        raise ValueError(f"need at least n_folds={n_folds} rows, got {n}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    dev = select_device(device)

    rows = _RowSource(x_arr, dev, preload_max_bytes)
    folds = np.stack([_stratified_folds(codes, n_folds, np.random.default_rng(_seed_ints(seed, s, 0)[0]))
                      for s in range(n_seeds)])  # [S, n]
    init_seeds = [_seed_ints(seed, s, 1)[0] for s in range(n_seeds)]
    shuffle_gen = torch.Generator().manual_seed(_seed_ints(seed, 0, 2)[0])
    heads = BatchedHeads(head, n_seeds, n_folds, dim, n_classes, hidden_dim, init_seeds).to(dev)
    opt = torch.optim.Adam(heads.parameters(), lr=lr, weight_decay=weight_decay)

    y_t = torch.from_numpy(codes).to(dev)
    # Small fold ids keep [n_seeds, n] cheap at 100M rows.
    folds_t = torch.from_numpy(folds.astype(np.int16 if n_folds < 2**15 else np.int64)).to(dev)
    fold_ids = torch.arange(n_folds, device=dev)[None, None, :]

    el2n_sum = torch.zeros(n, dtype=torch.float64, device=dev)
    grand_sum = torch.zeros(n, dtype=torch.float64, device=dev)
    aum_sum = torch.zeros(n, dtype=torch.float64, device=dev) if return_aum else None
    probs_sum = torch.zeros((n, n_classes), dtype=torch.float32, device=dev) if return_probs else None
    oof_correct = 0
    chunk = max(1024, min(65536, (1 << 26) // max(dim, 1)))

    last_epoch = epochs if (return_aum or return_probs) else score_epoch
    for epoch in range(1, last_epoch + 1):
        heads.train()
        # One shuffle per epoch shared by all heads (one GEMM serves every head); seeds still differ
        # in their fold split and initialisation.
        perm = torch.randperm(n, generator=shuffle_gen).to(dev)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb = rows.take(idx)  # [B, D]
            yb = y_t[idx]
            train_mask = (folds_t[:, idx].T[:, :, None] != fold_ids).to(xb.dtype)  # [B, S, K]
            logits = heads(xb)  # [B, S, K, C]
            ce = F.cross_entropy(
                logits.reshape(-1, n_classes),
                yb[:, None].expand(-1, n_seeds * n_folds).reshape(-1),
                reduction="none",
            ).view_as(train_mask)
            # Each head: mean loss over its own training rows in the batch; heads are independent.
            loss = ((ce * train_mask).sum(0) / train_mask.sum(0).clamp_min(1.0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        scoring = epoch == score_epoch
        want_probs = probs_sum is not None and epoch == epochs
        if not (scoring or return_aum or want_probs):
            continue
        heads.eval()
        with torch.no_grad():
            for s in range(n_seeds):
                # Rows grouped by fold: head (s, k) scores exactly the rows it never trained on.
                by_fold = torch.argsort(folds_t[s], stable=True)
                bounds = torch.bincount(folds_t[s].long(), minlength=n_folds).cumsum(0).tolist()
                for k in range(n_folds):
                    ids_all = by_fold[(bounds[k - 1] if k else 0):bounds[k]]
                    for c0 in range(0, ids_all.shape[0], chunk):
                        ids = ids_all[c0:c0 + chunk]
                        xr, yr = rows.take(ids), y_t[ids]
                        logits, el2n, grand = heads.score_one(s, k, xr, yr, grand_params)
                        if scoring:
                            el2n_sum.index_add_(0, ids, el2n.double())
                            grand_sum.index_add_(0, ids, grand.double())
                            oof_correct += int((logits.argmax(1) == yr).sum())
                        if aum_sum is not None:
                            aum_sum.index_add_(0, ids, margins(logits, yr).double())
                        if want_probs:
                            probs_sum.index_add_(0, ids, torch.softmax(logits.float(), dim=1))

    el2n_out = (el2n_sum / n_seeds).float().cpu().numpy()
    grand_out = (grand_sum / n_seeds).float().cpu().numpy()
    aum_out = (aum_sum / (n_seeds * epochs)).float().cpu().numpy() if aum_sum is not None else None
    if not (np.all(np.isfinite(el2n_out)) and np.all(np.isfinite(grand_out))):
        raise ValueError("EL2N produced non-finite scores: check emb for NaN/inf or lower lr")
    class_sizes = np.bincount(codes, minlength=n_classes)
    info: dict[str, Any] = {
        "method": "el2n_embedding",
        "paper": "Paul et al. 2021, Deep Learning on a Data Diet",
        "orientation": "el2n/grand: higher = harder; aum: lower = harder",
        "head": head,
        "hidden_dim": hidden_dim if head == "mlp" else None,
        "n_seeds": n_seeds,
        "n_folds": n_folds,
        "epochs": epochs,
        "score_epoch": score_epoch,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "optimizer": "adam",
        "grand_params": "all" if head == "linear" else grand_params,
        "grand_closed_form": "linear: el2n*sqrt(|h|^2+1)" if head == "linear" else "mlp: exact per-sample",
        "cross_fitting": "out-of-fold, stratified folds redrawn per seed",
        "seed": seed,
        "device": str(dev),
        "n": n,
        "dim": dim,
        "n_classes": n_classes,
        "classes_smaller_than_n_folds": int((class_sizes < n_folds).sum()),
        "oof_accuracy_at_score_epoch": oof_correct / (n * n_seeds),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    probs_out = (probs_sum / n_seeds).cpu().numpy() if probs_sum is not None else None
    return EL2NResult(el2n=el2n_out, grand=grand_out, aum=aum_out, info=info, probs=probs_out,
                      classes=classes if return_probs else None)


# --------------------------------------------------------------------------------------------------
# Model mode
# --------------------------------------------------------------------------------------------------


def _last_layer_names(model: nn.Module) -> list[str]:
    """Parameter names of the last module (registration order) that owns parameters directly."""
    last: list[str] = []
    for mod_name, module in model.named_modules():
        own = [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
        if own:
            last = own
    if not last:
        raise ValueError("model has no parameters")
    return last


def _param_names(model: nn.Module, params: str | Sequence[str]) -> list[str]:
    named = dict(model.named_parameters())
    if isinstance(params, str):
        if params == "all":
            return [k for k, v in named.items() if v.requires_grad]
        if params == "last":
            return _last_layer_names(model)
        raise ValueError(f"params must be 'all', 'last' or a list of parameter names, got {params!r}")
    names = list(params)
    missing = [p for p in names if p not in named]
    if missing or not names:
        raise ValueError(f"unknown parameter names {missing or names}; the model has {list(named)}")
    return names


def per_example_grad_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    params: str | Sequence[str] = "all",
    chunk_size: int = 64,
) -> torch.Tensor:
    """‖∇_θ CE(model(x_i), y_i)‖₂ for every sample i, via ``torch.func`` (vmap over grad).

    Each sample's loss is its own cross-entropy (a batch of one), so there is no 1/B factor from a mean
    reduction. The model runs in **eval mode** (BatchNorm uses its running statistics, dropout is off);
    its previous mode is restored afterwards. Memory is about ``chunk_size`` × (number of selected
    parameters) floats for the per-sample gradients.

    Args:
        model: a classifier returning logits ``[B, C]``.
        x: inputs ``[n, ...]``; y: int labels ``[n]``. Moved to the model's device.
        params: ``"all"`` trainable parameters, ``"last"`` (the parameters of the last module, in
            registration order, that owns parameters — the final ``nn.Linear`` of a typical classifier),
            or an explicit list of parameter names.
        chunk_size: samples per vmap call.

    Returns:
        float32 tensor ``[n]`` on the CPU; higher = larger gradient (harder).
    """
    from torch.func import functional_call, grad, vmap

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    names = _param_names(model, params)
    named = dict(model.named_parameters())
    try:
        dev = next(iter(named.values())).device
    except StopIteration as exc:
        raise ValueError("model has no parameters") from exc
    wrt = {k: named[k].detach() for k in names}
    const = {k: v.detach() for k, v in named.items() if k not in wrt}
    const.update({k: v.detach() for k, v in model.named_buffers()})

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **const}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    norms = []
    try:
        for c0 in range(0, x.shape[0], chunk_size):
            xc = x[c0:c0 + chunk_size].to(dev)
            yc = y[c0:c0 + chunk_size].to(dev).long()
            grads = per_sample_grads(wrt, xc, yc)
            sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1, dtype=torch.float64) for g in grads.values())
            norms.append(torch.sqrt(sq).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(norms) if norms else torch.zeros(0)


class _Indexed:
    """Wraps a dataset of ``(x, y)`` items so batches also carry the row index (a map-style dataset: DataLoader
    needs only __len__ and __getitem__, so no torch base class)."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        item = self.base[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"dataset items must be (x, y) pairs, item {i} is {type(item).__name__}")
        return i, item[0], item[1]


def _check_labels(y: torch.Tensor, n_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"labels must be ints in [0, {n_classes}) to match the model's {n_classes} outputs, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def el2n_model_scores(
    model_factory: Callable[[], nn.Module],
    dataset: torch.utils.data.Dataset,
    *,
    score_dataset: torch.utils.data.Dataset | None = None,
    n_seeds: int = 3,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    grand: bool = True,
    grand_params: str | Sequence[str] = "all",
    chunk_size: int = 64,
    record_aum: bool = True,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> EL2NResult:
    """EL2N and GraNd with the real model (Paul et al. 2021, model mode).

    For each seed: build ``model_factory()`` (under a seeded, forked torch RNG, so the caller's global RNG
    is untouched), train it ``epochs`` epochs on ``dataset`` (shuffled mini-batches, mean cross-entropy,
    SGD with momentum or Adam at a constant ``lr`` — the early part of a longer schedule, as the paper
    scores at epoch 20 of 200), then in eval mode score every row of ``score_dataset`` (default: the
    same dataset; pass an un-augmented copy when ``dataset`` augments): EL2N from the logits and GraNd
    from :func:`per_example_grad_norms`. Scores are averaged over seeds.

    Args:
        model_factory: returns a fresh classifier ``nn.Module`` mapping a batch to logits ``[B, C]``.
        dataset: items ``(x, y)`` with ``y`` an int in ``[0, C)``.
        score_dataset: row-aligned dataset scored after training (no augmentation); default ``dataset``.
        grand: compute GraNd (the per-sample gradients dominate the cost); False leaves it NaN.
        grand_params: ``"all"``, ``"last"`` or parameter names (see :func:`per_example_grad_norms`).
        record_aum: also record AUM (Pleiss et al. 2020) from the training-mode logits of each step,
            in-sample as in the paper, averaged over epochs and seeds.

    Returns:
        :class:`EL2NResult`; EL2N/GraNd higher = harder, AUM lower = harder.
    """
    t0 = time.perf_counter()
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    for name, value in (("n_seeds", n_seeds), ("epochs", epochs), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    score_ds = dataset if score_dataset is None else score_dataset
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("dataset is empty")
    if len(score_ds) != n:  # type: ignore[arg-type]
        raise ValueError(f"score_dataset has {len(score_ds)} rows but dataset has {n}")  # type: ignore[arg-type]
    dev = select_device(device)
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

    el2n_sum = torch.zeros(n, dtype=torch.float64)
    grand_sum = torch.zeros(n, dtype=torch.float64)
    aum_sum = torch.zeros(n, dtype=torch.float64)
    aum_count = torch.zeros(n, dtype=torch.float64)
    train_acc: list[float] = []
    n_classes = None
    for s in range(n_seeds):
        init_seed, shuffle_seed = _seed_ints(seed, s)[:2]
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(init_seed)
            model = model_factory().to(dev)
            params = [p for p in model.parameters() if p.requires_grad]
            if optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
                )
            else:
                opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            loader = torch.utils.data.DataLoader(
                _Indexed(dataset), batch_size=batch_size, shuffle=True, num_workers=num_workers,
                generator=torch.Generator().manual_seed(shuffle_seed),
            )
            correct = 0
            for _ in range(epochs):
                model.train()
                correct = 0
                for idx, xb, yb in loader:
                    xb, yb = xb.to(dev), torch.as_tensor(yb).to(dev).long()
                    logits = model(xb)
                    if n_classes is None:
                        n_classes = int(logits.shape[1])
                    _check_labels(yb, n_classes)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        correct += int((logits.argmax(1) == yb).sum())
                        if record_aum:
                            aum_sum.index_add_(0, idx, margins(logits.detach(), yb).double().cpu())
                            aum_count.index_add_(0, idx, torch.ones(idx.shape[0], dtype=torch.float64))
            train_acc.append(correct / n)

            model.eval()
            score_loader = torch.utils.data.DataLoader(
                _Indexed(score_ds), batch_size=max(batch_size, chunk_size), shuffle=False, num_workers=num_workers
            )
            for idx, xb, yb in score_loader:
                xb, yb = xb.to(dev), torch.as_tensor(yb).to(dev).long()
                with torch.no_grad():
                    logits = model(xb)
                assert n_classes is not None
                _check_labels(yb, n_classes)
                err = torch.softmax(logits.float(), dim=1) - F.one_hot(yb, n_classes).float()
                el2n_sum.index_add_(0, idx, err.norm(dim=1).double().cpu())
                if grand:
                    g = per_example_grad_norms(model, xb, yb, params=grand_params, chunk_size=chunk_size)
                    grand_sum.index_add_(0, idx, g.double())
        del model, opt

    el2n_out = (el2n_sum / n_seeds).float().numpy()
    grand_out = (grand_sum / n_seeds).float().numpy() if grand else np.full(n, np.nan, dtype=np.float32)
    aum_out = (aum_sum / aum_count.clamp_min(1)).float().numpy() if record_aum else None
    info: dict[str, Any] = {
        "method": "el2n_model",
        "paper": "Paul et al. 2021, Deep Learning on a Data Diet",
        "orientation": "el2n/grand: higher = harder; aum: lower = harder",
        "n_seeds": n_seeds,
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
        "lr_schedule": "constant",
        "momentum": momentum if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "grand": grand,
        "grand_params": grand_params if isinstance(grand_params, str) else list(grand_params),
        "aum": "in-sample, train-mode logits of every step" if record_aum else None,
        "train_accuracy_last_epoch": train_acc,
        "seed": seed,
        "device": str(dev),
        "n": n,
        "n_classes": n_classes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return EL2NResult(el2n=el2n_out, grand=grand_out, aum=aum_out, info=info)


# ---- the curate step --------------------------------------------------------------------------------------------------

StepRule = Literal[("auto", *RULES)]  # auto: chosen by evidence (ctx.choose_rule), or any rule of scorers/select.py


@step("el2n", reason="el2n", needs=("labels",),
      scores=(Score("score_el2n", higher="harder", hardness=1), Score("score_grand", higher="harder", hardness=1),
              Score("score_aum", higher="more likely correctly labelled (low = likely mislabeled)", hardness=-1)),
      orientation="score_el2n, score_grand: higher = harder (out-of-fold proxy heads); score_aum: low = likely mislabeled")
def step_el2n(
    ctx: ScoringContext,
    *,
    keep_fraction: Fraction | None = None,
    rule: StepRule = "auto",
    head: Head = "linear",
    n_seeds: Count = 5,
    n_folds: Annotated[int, Field(ge=2)] = 5,
    epochs: Count = 10,
    score_epoch: Count = 2,
    with_aum: bool = False,
    seed: int | None = None,
) -> StepOutput:
    """EL2N and GraNd (Paul et al. 2021) from out-of-fold proxy heads on the embeddings of the rows still alive.

    score_el2n, score_grand: higher = harder (kept first by rule hard). For the linear head GraNd is exactly
    EL2N·√(‖h‖²+1), so on unit embeddings it ranks like EL2N. With with_aum, score_aum from the same training
    (low = likely mislabeled) and CCS cuts by it, as Zheng et al. do. With keep_fraction, `rule` selects:
    auto (default) picks among hard / easy / ccs / moderate / random by held-out probe accuracy on these scores
    (ctx.choose_rule: the pipeline's pipeline/evaluate.py auto_rule; evidence in run.json, cached per store);
    heuristic = hard at ≥ 70% kept, CCS below; or any rule of scorers/select.py.
    """
    rows = np.flatnonzero(ctx.alive)
    result = el2n_embedding_scores(
        ctx.emb[rows], ctx.labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs, score_epoch=score_epoch,
        return_aum=with_aum, device=ctx.device, seed=ctx.seed if seed is None else seed,
    )
    n = len(ctx.uids)
    out = StepOutput(
        scores={"score_el2n": scatter(n, rows, result.el2n), "score_grand": scatter(n, rows, result.grand)},
        info={"proxy": result.info},
    )
    cut = None
    if result.aum is not None:
        out.scores["score_aum"] = scatter(n, rows, result.aum)
        cut = -out.scores["score_aum"]
    if keep_fraction is not None:
        if rule == "auto":
            if ctx.choose_rule is None:
                raise ValueError("el2n rule: auto chooses by evidence but this run has no rule chooser; give another rule")
            out.info["auto_evidence"] = ctx.choose_rule(ctx, out.scores["score_el2n"], budget_for(ctx, keep_fraction))
            rule = out.info["auto_evidence"]["rule"]
        out.drop, note = select_among_alive(ctx, out.scores["score_el2n"], keep_fraction, rule=rule, **rule_knobs(ctx, rule, cut))
        out.info.update(note)
    return out
