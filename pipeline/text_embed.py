"""Text embeddings from the text tower of the run's open_clip model (captions for clip_score, label prompts for
label–image agreement). Same model, same weights as the image embeddings, so the two share one space.

Batched, on the embedder's device, fp32-normalised; captions are embedded once per distinct text and cached beside
the store under text/<key>.npy (key = store fingerprint + model identity + texts), so a rerun does not embed again.
"""
from __future__ import annotations

import hashlib
import json
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


def cached_text_embeddings(cache_dir: Path, identity: dict[str, Any], texts: Sequence[str], embedder_factory: Any,
                           *, batch_size: int = 256) -> np.ndarray:
    """Embeddings of the distinct `texts`, read from cache_dir when this exact (identity, texts) was embedded before.

    `embedder_factory()` builds the embedder only on a cache miss (a rerun never loads the model for text).
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass") + b"\0")
    path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.npy"
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            return emb
    emb = encode_texts(embedder_factory(), texts, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    return emb
