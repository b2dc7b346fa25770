"""Image embedders and the batched embedding loop.

* `pipeline.embed.clip`: `ClipEmbedder` (an open_clip image tower) and how its pretrained weights are found.
* `pipeline.embed.pixels`: `PixelsEmbedder`, resized pixels → PCA (the model-free baseline).
* `pipeline.embed.loop`: `embed_refs`, the DataLoader loop that reads, decodes and preprocesses in workers.
* `pipeline.embed.common`: the `Embedder` protocol both embedders follow, and their shared helpers.
"""
from pipeline.embed.clip import CHECKPOINT_HINT, ClipEmbedder, WeightsUnavailableError
from pipeline.embed.common import Embedder
from pipeline.embed.loop import (
    STATUS_DECODE_ERROR,
    STATUS_IO_ERROR,
    STATUS_PREPROCESS_ERROR,
    EmbeddedShard,
    embed_refs,
)
from pipeline.embed.pixels import PixelsEmbedder

__all__ = [
    "CHECKPOINT_HINT", "STATUS_DECODE_ERROR", "STATUS_IO_ERROR", "STATUS_PREPROCESS_ERROR", "ClipEmbedder", "EmbeddedShard",
    "Embedder", "PixelsEmbedder", "WeightsUnavailableError", "embed_refs",
]
