"""Caption embeddings a source ships beside its images (clip_score reads them instead of running the text tower).

Three layouts: LAION ``text_emb/*.npy`` (row-aligned with the image files; pipeline.sources.PrecomputedSource),
DataComp per-shard ``.npz`` files beside the ``.parquet`` metadata with arrays ``b32_txt`` / ``l14_txt`` (rows aligned
with that parquet's rows, which carry the ``uid``), and a Parquet column of float lists in a table source
(``text_embedding_column``). The sources read the files (pipeline.sources); this module holds the pieces they share:
the .npz array choice, uid matching, unit rows. Rows are matched to the store's rows by uid; a row with no (or a zero / non-finite)
embedding is "no caption" (a zero row).
"""
from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class TextSourceError(ValueError):
    """Shipped caption embeddings that cannot be used (missing array, other dimension, no shared uid)."""


def npz_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an .npz file, from the array headers only (no data read)."""
    out: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape = np.lib.format.read_array_header_1_0(fh)[0]
                    elif version == (2, 0):
                        shape = np.lib.format.read_array_header_2_0(fh)[0]
                    else:  # a newer header format: read the array itself
                        shape = None
                if shape is None:
                    with np.load(path, allow_pickle=False) as z:
                        shape = z[name[:-4]].shape
                out[name[:-4]] = tuple(int(s) for s in shape)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise TextSourceError(f"cannot read {str(path)!r} as .npz: {type(exc).__name__}: {exc}") from None
    return out


def choose_text_key(shapes: dict[str, tuple[int, ...]], dim: int, *, key: str | None, path: str | Path) -> str:
    """The .npz array holding caption embeddings for image embeddings of dimension `dim`.

    `key` given: that array, which must be 2-d with dimension `dim`. Otherwise the one ``*_txt`` array (DataComp:
    ``b32_txt`` 512-d, ``l14_txt`` 768-d) whose dimension is `dim`; none or several is a TextSourceError naming them.
    """
    where = f"text embeddings {str(path)!r}"
    if key is not None:
        if key not in shapes:
            raise TextSourceError(f"{where} have no array {key!r} (text_emb_key); arrays: {sorted(shapes)}")
        shape = shapes[key]
        if len(shape) != 2:
            raise TextSourceError(f"{where}: array {key!r} has shape {shape}, expected rows × dim")
        if shape[1] != dim:
            raise TextSourceError(f"{where}[{key}] have dim {shape[1]}, the image embeddings {dim}: "
                                  "clip_score needs both from one CLIP model")
        return key
    texts = {k: s for k, s in shapes.items() if k.endswith("_txt") and len(s) == 2}
    if not texts:
        raise TextSourceError(f"{where} have no *_txt array (DataComp b32_txt / l14_txt); arrays: {sorted(shapes)}; "
                              "name one with text_emb_key")
    fits = sorted(k for k, s in texts.items() if s[1] == dim)
    if not fits:
        dims = ", ".join(f"{k} dim {s[1]}" for k, s in sorted(texts.items()))
        raise TextSourceError(f"{where} have {dims}, the image embeddings dim {dim}: clip_score needs both from one CLIP model")
    if len(fits) > 1:
        raise TextSourceError(f"{where}: several text arrays have the image embeddings' dim {dim} ({', '.join(fits)}); "
                              "choose one with text_emb_key")
    return fits[0]


def unit_rows(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """Rows scaled to unit length in float32; zero, NaN or Inf rows become zero rows ("no caption")."""
    t = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(t, axis=1, keepdims=True)
    good = np.isfinite(t).all(axis=1) & np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)
    return np.where(good[:, None], t / np.where(good[:, None], norms, 1.0), 0.0).astype(dtype)


def align_by_uid(row_uids: Sequence[Any], uids: Sequence[Any], emb: np.ndarray, *, what: str) -> np.ndarray:
    """`emb` (one row per entry of `uids`) reordered to `row_uids`' order; rows whose uid `uids` lacks are zero.

    A uid repeated in `uids` is a TextSourceError (which row would be its caption?), and so is no shared uid at all
    (the files belong to another data set).
    """
    import polars as pl

    have = pl.DataFrame({"uid": pl.Series(list(uids), dtype=pl.String), "j": np.arange(len(uids), dtype=np.int64)})
    repeated = have.filter(pl.col("uid").is_duplicated())["uid"].unique().head(5).to_list()
    if repeated:
        raise TextSourceError(f"{what}: uid(s) {repeated} appear more than once")
    rows = pl.DataFrame({"uid": pl.Series(list(row_uids), dtype=pl.String)}).with_row_index("i")
    joined = rows.join(have, on="uid", how="left").sort("i")
    j = joined["j"].to_numpy()
    found = ~joined["j"].is_null().to_numpy()
    if len(row_uids) and not found.any():
        raise TextSourceError(f"{what}: none of the {len(row_uids)} rows' uids is among its {len(uids)} uids "
                              f"(first row uid {row_uids[0]!r}, first of theirs {uids[0] if len(uids) else None!r})")
    out = np.zeros((len(row_uids), emb.shape[1]), dtype=np.float32)
    out[found] = np.asarray(emb[j[found].astype(np.int64)], dtype=np.float32)
    return out


def clip_embed_dim(embed: Any) -> int | None:
    """The image embedding dimension an ``embed.kind: clip`` config will produce, from the open_clip model config
    (no weights loaded); None when it is not known before the model is built (pixels, an unregistered model)."""
    if getattr(embed, "kind", None) != "clip":
        return None
    import json

    if embed.model_config_file is not None:
        try:
            return int(json.loads(Path(embed.model_config_file).read_text())["embed_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    import open_clip

    cfg = open_clip.get_model_config(embed.model.replace("/", "-"))
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None
