import numpy as np
import torch

from pipeline.embed import ClipEmbedder
from pipeline.text_embed import cached_text_embeddings, encode_texts


def test_text_tower_embeddings_are_unit_batched_and_match_open_clip(tiny_clip_model, tmp_path):
    import open_clip

    torch.manual_seed(0)
    embedder = ClipEmbedder(tiny_clip_model, None, device="cpu")
    texts = ["a photo of a cat.", "a photo of a dog.", "a red car", "", "a photo of a cat."]
    emb = encode_texts(embedder, texts, batch_size=2)
    assert emb.shape == (5, embedder.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[4], atol=1e-6)  # batching does not change a text's embedding
    with torch.no_grad():
        ref = embedder.model.encode_text(open_clip.get_tokenizer(tiny_clip_model)(texts[:1])).float()
    np.testing.assert_allclose(emb[0], torch.nn.functional.normalize(ref, dim=-1)[0].numpy(), atol=1e-5)

    built = []

    def factory():
        built.append(1)
        return embedder

    first = cached_text_embeddings(tmp_path, {"model": tiny_clip_model}, texts, factory)
    again = cached_text_embeddings(tmp_path, {"model": tiny_clip_model}, texts, factory)
    np.testing.assert_array_equal(first, again)
    assert len(built) == 1  # the rerun read the cache and never built the model
    np.testing.assert_array_equal(cached_text_embeddings(tmp_path, {"model": tiny_clip_model}, texts[:2][::-1], factory),
                                  first[:2][::-1])
    assert len(built) == 1  # a subset, in another order: every text is cached
    # new captions (an append): only those are embedded, into one new part; the old rows come from the cache
    more = [*texts, "a blue boat", "a green frog", "a blue boat"]
    grown = cached_text_embeddings(tmp_path, {"model": tiny_clip_model}, more, factory)
    assert len(built) == 2
    np.testing.assert_array_equal(grown[:5], first)
    np.testing.assert_allclose(grown[5:], encode_texts(embedder, more[5:]), atol=1e-6)
    parts = sorted(p for p in tmp_path.rglob("part-*.keys.npy"))
    assert len(parts) == 2 and sorted(len(np.load(p)) for p in parts) == [2, 4]  # 4 distinct texts first, then 2 new
    # another model identity does not share the cache
    cached_text_embeddings(tmp_path, {"model": "other"}, texts[:1], factory)
    assert len(built) == 3
    # an unfinished part (rows written, keys not) is ignored
    for p in tmp_path.rglob("part-*.keys.npy"):
        p.unlink()
    cached_text_embeddings(tmp_path, {"model": tiny_clip_model}, texts[:1], factory)
    assert len(built) == 4
