"""Text embeddings from the text tower of the run's open_clip model (captions for clip_score, label prompts for
label–image agreement). Same model, same weights as the image embeddings, so the two share one space.

Batched, on the embedder's device, fp32-normalised; each distinct text is embedded once per model and cached beside the
store under text/<model identity>/ (parts of rows keyed by the texts' digests), so a rerun embeds only captions it has
not seen: after an append, the new rows' captions, like the image embeddings of new shards.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_path


def encode_texts(embedder: Any, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """Unit text embeddings (len(texts) × dim float32) from `embedder`'s open_clip model (a ClipEmbedder)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    model = getattr(embedder, "model", None)
    if model is None or not hasattr(model, "encode_text"):
        raise ValueError("clip_score and label agreement need a CLIP embedder with a text tower (embed.kind: clip)")
    tokenizer = open_clip.get_tokenizer(embedder.model_name)
    device = next(model.parameters()).device
    out = np.empty((len(texts), int(embedder.dim)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            autocast = getattr(embedder, "autocast_dtype", None)
            if autocast is not None:
                with torch.autocast(device.type, dtype=autocast):
                    feats = model.encode_text(tokens)
            else:
                feats = model.encode_text(tokens)
            out[start:start + len(tokens)] = F.normalize(feats.float(), dim=-1).cpu().numpy()
    return out


def _text_keys(texts: Sequence[str]) -> np.ndarray:
    """A 128-bit digest per text (numpy S16): the cache's row key."""
    return np.array([hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts], dtype="S16")


def cached_text_embeddings(cache_dir: Path, identity: dict[str, Any], texts: Sequence[str], embedder_factory: Any,
                           *, batch_size: int = 256) -> np.ndarray:
    """Embeddings of `texts` (one row each, in order); only texts this model has not embedded before are embedded.

    The cache is per text, not per call: cache_dir/<model identity digest>/ holds parts, each a ``.emb.npy`` (rows)
    and a ``.keys.npy`` (the texts' digests, written last: a part without it is unfinished and ignored). A rerun after
    new captions arrived embeds just those and adds one part; parts are memory-mapped and only the rows asked for are
    read. `embedder_factory()` builds the embedder only when some text is new (a rerun never loads the model for text).
    """
    folder = Path(cache_dir) / hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]
    keys = _text_keys(texts)
    out: np.ndarray | None = None
    found = np.zeros(len(texts), dtype=bool)
    for keys_path in sorted(folder.glob("part-*.keys.npy")):
        try:
            part_keys = np.load(keys_path, allow_pickle=False)
            emb = np.load(keys_path.with_name(keys_path.name.replace(".keys.npy", ".emb.npy")), mmap_mode="r")
        except (OSError, ValueError):
            continue  # unreadable part: its texts are embedded again
        if part_keys.dtype != np.dtype("S16") or emb.ndim != 2 or emb.shape[0] != len(part_keys) or not len(part_keys):
            continue  # damaged or empty part: its texts are embedded again
        order = np.argsort(part_keys)
        rows = order[np.searchsorted(part_keys, keys, sorter=order).clip(0, len(part_keys) - 1)]
        hit = ~found & (part_keys[rows] == keys)
        if hit.any():
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[hit] = np.asarray(emb[rows[hit]], dtype=np.float32)
            found |= hit
    if found.all() and out is not None:
        return out
    if not len(texts):
        return encode_texts(embedder_factory(), [], batch_size=batch_size)
    new_keys, first = np.unique(keys[~found], return_index=True)
    new_texts = [texts[i] for i in np.flatnonzero(~found)[first]]
    new = encode_texts(embedder_factory(), new_texts, batch_size=batch_size)
    name = f"part-{uuid.uuid4().hex}"
    with atomic_path(folder / f"{name}.emb.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, new)
    with atomic_path(folder / f"{name}.keys.npy") as tmp:  # last: the part is complete
        with open(tmp, "wb") as fh:
            np.save(fh, new_keys)
    if out is None:
        out = np.empty((len(texts), new.shape[1]), dtype=np.float32)
    out[~found] = new[np.searchsorted(new_keys, keys[~found])]
    return out
