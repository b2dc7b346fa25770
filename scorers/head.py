"""Model heads on embeddings: a linear or MLP head read from the user's weights, e.g. the LAION aesthetic predictor
(christophschuhmann/improved-aesthetic-predictor: an MLP 768→1024→128→64→16→1 on CLIP ViT-L/14 image embeddings,
no activations between its layers) or a CLIP-embedding NSFW classifier (LAION-AI/CLIP-based-NSFW-Detector: a small
ReLU MLP with a sigmoid output), as NeMo Curator runs them.

Method: y = f_L(…f_1(x)) with f_i(x) = act(W_i x + b_i) for i < L and the last layer linear, then an optional
sigmoid / softmax; x is the row's unit embedding (the aesthetic predictor was trained on L2-normalised CLIP
embeddings). Layers are taken from a state dict in natural key order (``layers.0`` < ``layers.2`` < ``layers.10``),
which is the order of an ``nn.Sequential``'s Linear layers.

Orientation: whatever the head predicts, for a score column named after it: aesthetic higher = nicer (keep the
highest); an NSFW probability higher = more unsafe (the step's ``keep: low`` keeps the lowest).
"""
from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np

from scorers.step import Between, Fraction, NonNegativeInt, Score, ScoringContext, StepOutput, drop_by_score, step

__all__ = ["layers_from_state_dict", "head_scores", "ACTIVATIONS", "OUTPUTS"]

ACTIVATIONS = ("none", "relu", "gelu")
OUTPUTS = ("raw", "sigmoid", "softmax")
_ROWS = 16_384


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def layers_from_state_dict(state: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (weight out × in, bias out) pairs of a state dict's Linear layers, in natural key order, checked to chain.

    Every 2-D ``*weight`` needs a 1-D ``*bias`` beside it; other tensors (e.g. 1-D BatchNorm buffers) are refused
    so a head that is not a plain Linear stack is not run wrongly.
    """
    weights = sorted((k for k in state if k.endswith("weight")), key=_natural)
    if not weights:
        raise ValueError("the head file has no '*weight' tensor")
    used: set[str] = set()
    layers = []
    for wk in weights:
        w = np.asarray(state[wk], dtype=np.float32)
        bk = wk[: -len("weight")] + "bias"
        if w.ndim != 2 or bk not in state:
            raise ValueError(f"head tensor {wk!r} is not a Linear layer's weight (2-D, with {bk!r} beside it)")
        b = np.asarray(state[bk], dtype=np.float32)
        if b.shape != (w.shape[0],):
            raise ValueError(f"head bias {bk!r} has shape {b.shape}, expected ({w.shape[0]},)")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise ValueError(f"head layer {wk!r} takes {w.shape[1]} inputs but the layer before gives {layers[-1][0].shape[0]}")
        layers.append((w, b))
        used |= {wk, bk}
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"head file has tensors that are not Linear weights/biases: {extra[:5]}")
    return layers


def head_scores(
    emb: Any,
    layers: list[tuple[np.ndarray, np.ndarray]],
    *,
    activation: str = "none",
    output: str = "raw",
    column: int = 0,
) -> np.ndarray:
    """One float32 score per row: the head's output ``column`` (after ``output``: raw, sigmoid or softmax).

    ``emb``: n × d unit rows (float16/32, memory-mapped is fine: read in blocks). ``activation`` between hidden layers
    (the LAION aesthetic MLP has none; the NSFW detector uses relu).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    n, d = emb.shape
    if layers[0][0].shape[1] != d:
        raise ValueError(f"the head takes {layers[0][0].shape[1]}-d inputs; the embeddings are {d}-d (a different embedder?)")
    n_out = layers[-1][0].shape[0]
    if not 0 <= column < n_out:
        raise ValueError(f"column {column} is outside the head's {n_out} outputs")
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _ROWS):
        x = np.asarray(emb[start:start + _ROWS], dtype=np.float32)
        for i, (w, b) in enumerate(layers):
            x = x @ w.T + b
            if i < len(layers) - 1:
                if activation == "relu":
                    x = np.maximum(x, 0.0)
                elif activation == "gelu":
                    from scipy.special import erf

                    x = 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
        if output == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
        elif output == "softmax":
            x = np.exp(x - x.max(axis=1, keepdims=True))
            x = x / x.sum(axis=1, keepdims=True)
        out[start:start + len(x)] = x[:, column]
    return out

# ---- the curate step --------------------------------------------------------------------------------------------------

@step("head", reason="head", scores=(Score("score_{name}", higher="as the head says (keep: high or low decides)"),),
      orientation="score_<name>: the head's output on the embedding; keep: high or low decides")
def step_head(
    ctx: ScoringContext,
    *,
    path: str,
    name: str,
    activation: Literal["none", "relu", "gelu"] = "none",
    output: Literal["raw", "sigmoid", "softmax"] = "raw",
    column: NonNegativeInt = 0,
    expected_embedder: str | None = None,
    keep: Literal["high", "low"] = "high",
    keep_fraction: Fraction | None = None,
    threshold: float | None = None,
    quantile: Between(0, 1) | None = None,
) -> StepOutput:
    """A linear/MLP head on the embeddings from a safetensors file (head_scores above), e.g. the LAION aesthetic predictor.

    The head's expected embedder (`expected_embedder`, else the file's metadata key `embedder`, as "model/pretrained")
    must match the store's; score_<name>; keep high (aesthetic) or low (an NSFW probability) by keep_fraction,
    threshold or quantile (or none of them: score only).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not name.isidentifier():
        raise ValueError(f"head name must be a plain identifier (it names the column score_{name}), got {name!r}")
    with safe_open(path, framework="numpy") as fh:
        file_meta = fh.metadata() or {}
    expected = expected_embedder or file_meta.get("embedder")
    actual = ctx.embedder_name()
    if expected is None:
        raise ValueError(f"head {name}: say which embedder it was trained on (expected_embedder: model/pretrained, or "
                         f"'embedder' in the safetensors metadata); this store's is {actual}")
    if expected != actual:
        raise ValueError(f"head {name} expects embeddings of {expected}, this store holds {actual}")
    layers = layers_from_state_dict(load_file(path))
    score = head_scores(ctx.emb, layers, activation=activation, output=output, column=column)
    given = [v for v in (keep_fraction, threshold, quantile) if v is not None]
    if len(given) > 1:
        raise ValueError("head takes at most one of keep_fraction, threshold, quantile")
    out = StepOutput(scores={f"score_{name}": score}, info={"head": path, "embedder": expected,
                                                            "layers": [list(w.shape) for w, _ in layers]})
    if given:
        out.drop, note = drop_by_score(ctx, score, keep=keep, keep_fraction=keep_fraction, threshold=threshold, quantile=quantile)
        out.info.update(note)
    return out
