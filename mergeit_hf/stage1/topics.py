"""Stage 1b: k-means topics; fit once, then ``ds.map(topics, batched=True)`` adds ``cluster_id``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import STREAM_CHUNK_ROWS, iter_embeddings, take_embeddings
from mergeit_hf.stage1.dot import dot_products

KMEANS_SAMPLE_ROWS = 100_000
#: A fitted PCA: the mean and the (dim, kept dims) components that project an embedding.
Projection = tuple[np.ndarray, np.ndarray]
_PCA_SAMPLE_ROWS = 50_000


@dataclass(frozen=True, eq=False)
class TopicClusters:
    """Fitted topic centroids; calling it on a batch assigns each row to its nearest centroid."""

    centroids: np.ndarray  # (n_clusters, dim) float32, in the PCA space when there is one
    method: str = "kmeans"
    pca_mean: np.ndarray | None = None  # (dim,) with ``pca_components``: embeddings are projected first
    pca_components: np.ndarray | None = None  # (dim, kept dims) float32

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        if self.pca_components is None:
            return embeddings
        return dot_products(embeddings - self.pca_mean, self.pca_components.T)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = self.project(embeddings)
        # Squared euclidean distance minus the per-row constant |x|²: same argmin as KMeans.predict.
        distances = (self.centroids**2).sum(axis=1) - 2.0 * dot_products(embeddings, self.centroids)
        return distances.argmin(axis=1).astype(np.int32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "embedding" not in batch:
            raise KeyError("clustering needs the 'embedding' column; run ds.map(mergeit_hf.embed_batch) first")
        vectors = np.asarray(batch["embedding"], dtype=np.float32)
        if vectors.ndim == 1:
            return {"cluster_id": int(self.assign(vectors[None, :])[0])}
        return {"cluster_id": self.assign(vectors)}


def fit_topics(dataset: Dataset, config: MergeItConfig | None = None) -> TopicClusters:
    """Fit k-means on the ``embedding`` column; deterministic for ``config.seed``.

    Up to ``config.minibatch_kmeans_above`` rows: full k-means. Above it: mini-batch k-means on a random
    sample of ``KMEANS_SAMPLE_ROWS`` rows, so a million 384-d rows never sit in memory as one matrix.
    """
    config = config or MergeItConfig()
    if "embedding" not in dataset.column_names:
        raise KeyError("clustering needs the 'embedding' column; run ds.map(mergeit_hf.embed_batch) first")
    return fit_from_sample(lambda rows: take_embeddings(dataset, rows), len(dataset), config)


def fit_rows(n_rows: int, config: MergeItConfig) -> np.ndarray:
    """Positions (ascending) of the rows the fit reads: every row up to ``minibatch_kmeans_above``, else a
    random sample of ``KMEANS_SAMPLE_ROWS``. An engine gathers their embeddings wherever the rows live."""
    if n_rows <= config.minibatch_kmeans_above:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(config.seed).permutation(n_rows)[:KMEANS_SAMPLE_ROWS])


def _pca_rows(n_rows: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n_rows)[:_PCA_SAMPLE_ROWS])


def read_rows(n_rows: int, config: MergeItConfig) -> np.ndarray:
    """Every position (ascending) whose embedding ``fit_from_sample`` reads: ``fit_rows``, and the PCA's
    sample when ``pca_variance`` is set."""
    rows = fit_rows(n_rows, config)
    return np.union1d(rows, _pca_rows(n_rows, config.seed)) if config.pca_variance else rows


def fit_from_sample(
    embeddings_at: Callable[[np.ndarray], np.ndarray], n_rows: int, config: MergeItConfig
) -> TopicClusters:
    """The topic fit over ``n_rows`` rows whose embeddings ``embeddings_at(positions)`` returns (positions
    from ``fit_rows``): the same centroids whichever engine holds the rows."""
    if n_rows == 0:
        raise ValueError("cannot cluster an empty dataset")
    n_clusters = config.resolve_n_clusters(n_rows)
    pca = _fit_pca(embeddings_at, n_rows, config.pca_variance, config.seed) if config.pca_variance else None
    sample = _project(embeddings_at(fit_rows(n_rows, config)), pca)
    if n_rows <= config.minibatch_kmeans_above:
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=n_clusters, random_state=config.seed, n_init="auto").fit(sample)
        return _fitted(model.cluster_centers_, "kmeans", pca)
    # Mini-batch k-means on the sample: the centroids of 120 topics need no more, and assigning every row
    # afterwards is one matrix product per chunk.
    from sklearn.cluster import MiniBatchKMeans

    batch = max(STREAM_CHUNK_ROWS, 3 * n_clusters)
    model = MiniBatchKMeans(n_clusters=n_clusters, random_state=config.seed, batch_size=batch, n_init=3).fit(sample)
    return _fitted(model.cluster_centers_, "minibatch_kmeans", pca)


def _fit_pca(embeddings_at: Callable[[np.ndarray], np.ndarray], n_rows: int, variance: float, seed: int) -> Projection:
    """PCA keeping ``variance`` of the variance (the authors' scripts: 0.95), fitted on up to
    ``_PCA_SAMPLE_ROWS`` rows drawn at random: the components of a million rows need no more."""
    from sklearn.decomposition import PCA

    rows = _pca_rows(n_rows, seed)
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed).fit(embeddings_at(rows))
    return pca.mean_.astype(np.float32), pca.components_.T.astype(np.float32)


def _project(embeddings: np.ndarray, pca: Projection | None) -> np.ndarray:
    return embeddings if pca is None else (embeddings - pca[0]) @ pca[1]


def assign_topics(dataset: Dataset, topics: TopicClusters) -> np.ndarray:
    """Every row's topic, chunk by chunk in numpy (what ``ds.map(topics)`` adds, without per-row Python)."""
    return np.concatenate([topics.assign(chunk) for chunk in iter_embeddings(dataset)]).astype(np.int32)


def _fitted(centroids: np.ndarray, method: str, pca: Projection | None) -> TopicClusters:
    if pca is None:
        return TopicClusters(centroids.astype(np.float32), method)
    mean, components = pca
    return TopicClusters(centroids.astype(np.float32), f"pca {components.shape[1]}d + {method}", mean, components)


def add_topics(dataset: Dataset, config: MergeItConfig | None = None, **map_kwargs: Any) -> Dataset:
    """Fit topics and add the ``cluster_id`` column in one call."""
    topics = fit_topics(dataset, config)
    return dataset.map(topics, batched=True, desc="Assigning topics", **map_kwargs)
