"""Spherical k-means over a store: centroids fitted once, assignments fanned out per shard, both cached."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.config import CurateConfig
from scorers.device import faiss_gpu_available
from pipeline.faults import failpoint
from pipeline.fanout import FanOut, serial_fan_out
from pipeline.index import KMeansParams, KMeansResult, artefact_key, fit_centroids
from pipeline.store import EmbeddingStore


def kmeans_params(cfg: CurateConfig) -> KMeansParams:
    i = cfg.index
    return KMeansParams(k=i.k, niter=i.niter, seed=i.seed, max_points_per_centroid=i.max_points_per_centroid)


def fit_index(cfg: CurateConfig, store: EmbeddingStore, emb: np.ndarray, fan_out: FanOut = serial_fan_out) -> KMeansResult:
    """Spherical k-means over the store: centroids fitted once on faiss's sample (the fan-in), then every shard
    assigned on its own (the fan-out, one task per shard). Artefacts are cached under <store>/index keyed by the
    store's fingerprint and the parameters; a rerun reassigns only the shards without a saved assignment."""
    params = kmeans_params(cfg)
    if params.k > len(emb):
        raise ValueError(f"index.k = {params.k} but the store holds only {len(emb)} usable embeddings; lower index.k")
    key = artefact_key(store.fingerprint(), params)
    index_dir = store.root / "index"
    centroids_path = index_dir / f"centroids-{key}.npz"
    if centroids_path.exists():
        with np.load(centroids_path, allow_pickle=False) as data:
            centroids, used_gpu = data["centroids"], bool(data["used_gpu"])
    else:
        centroids, used_gpu = fit_centroids(emb, params)
        with atomic_path(centroids_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, centroids=centroids, used_gpu=used_gpu)
    shards = store.shards()
    fan_out(assign_shard, [{"store_root": store.root, "shard": s, "centroids": centroids, "key": key} for s in shards])
    dead = store.dead_codes()
    assignment, similarity = [], []
    for s in shards:  # a shard's saved assignment covers all its ok rows; tombstoned ones are left out here
        with np.load(_assignment_path(store.root, key, s), allow_pickle=False) as part:
            live = store.alive_ok_rows(s, dead)
            assignment.append(part["assignment"] if live is None else part["assignment"][live])
            similarity.append(part["similarity"] if live is None else part["similarity"][live])
    result = KMeansResult(
        centroids=centroids,
        assignment=np.concatenate(assignment) if assignment else np.empty(0, np.int32),
        similarity=np.concatenate(similarity) if similarity else np.empty(0, np.float32),
        params=params,
        used_gpu=used_gpu,
    )
    if cfg.index.knn and not (index_dir / f"knn-{key}.faiss").exists():
        from pipeline.index import KnnParams, build_knn_index, save_knn_index

        index, info = build_knn_index(emb, KnnParams(seed=cfg.index.seed))
        save_knn_index(index, info, index_dir, key)
    return result


def _assignment_path(store_root: Path, key: str, shard: int) -> Path:
    return Path(store_root) / "index" / f"assign-{key}" / f"{shard:05d}.npz"


def assign_shard(store_root: str | Path, shard: int, centroids: np.ndarray, key: str) -> int:
    """Nearest centroid (and its similarity) for every ok row of one shard, saved atomically; returns the rows
    assigned (0 when a saved assignment exists). Reads the shard through a memory map, chunk by chunk."""
    from pipeline.index import nearest_centroid
    from pipeline.store import StoreError

    path = _assignment_path(Path(store_root), key, shard)
    if path.exists():
        return 0
    store = EmbeddingStore(store_root)
    emb = store.read_embeddings(shard)
    sim, ids = nearest_centroid(emb, centroids, spherical=True, use_gpu=faiss_gpu_available())
    if not np.isfinite(sim).all():
        raise StoreError(f"store {store.root} holds NaN or Inf embeddings (shard {shard})")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, assignment=ids, similarity=sim)
    failpoint("assign_shard")
    return len(ids)
