"""Stage 1 on Ray Data, in the cluster: the rows stay there from reading to the written results.

  embedding   the input's own column, checked and L2-normalised in ``map_batches``; else an actor pool, each
              actor holding the model (one GPU each where the cluster has GPUs);
  topics      centroids fitted on the driver on the embeddings of the rows ``read_rows`` picks (every row up
              to ``minibatch_kmeans_above``, else a sample of 100,000: the fit is the datasets engine's
              own), then assigned in ``map_batches``;
  selection   facility location per topic, ``groupby("cluster_id").map_groups``, on the topic sizes counted
              by ``groupby`` and the budget split on the driver;
  pairs       the τ search per topic and system prompt, ``groupby(["cluster_id", "system"]).map_groups``.
The rows, the selected rows and the pairs are written by the cluster as Arrow files into a work folder (kept
while the process runs) and opened on the driver as memory-mapped datasets (``Dataset.from_file``), in the
datasets engine's order, never read or copied there. The driver holds the fit's sample, the topic sizes and
one int64 a row (the positions, for the sample).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Value, concatenate_datasets

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import matrix
from mergeit_hf.embeddings.embedder import (
    Embedder,
    check_dimension,
    embedding_dimension,
    given_source,
    normalise_needed,
    unit_vectors,
)
from mergeit_hf.endpoints.sending.request_cache import default_cache_dir
from mergeit_hf.engines.ray.reading import ROW, ValidRows
from mergeit_hf.errors import InputError
from mergeit_hf.inputs.loading import EMBEDDING_COLUMN, checked_vectors
from mergeit_hf.stage1.pairs import PAIR_FEATURES, SOURCE_COLUMNS, PairMatch, match_cluster, pair_columns
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage1.selection import SelectionPlan, allocate_budget, facility_location_ranking
from mergeit_hf.stage1.topics import TopicClusters, fit_from_sample, read_rows

EMBED_BATCH_ROWS = 1024  # the datasets engine's ``map`` batch
_EMBED_BATCH = "_embed_batch"
MATCH_INDEX = "_match_index"  # a group's place among its topic's groups: the datasets engine's pair order
_VECTOR = pa.list_(pa.float32())
_MATCHED_FEATURES = Features({**PAIR_FEATURES, MATCH_INDEX: Value("int64")})


def run_stage1_ray(
    rows: Dataset | ValidRows, config: MergeItConfig | None = None, work_dir: str | Path | None = None
) -> Stage1Result:
    """Stage 1 on Ray Data over validated rows (``read_on_cluster``, or ``load_rows``' Dataset); the result is
    the datasets engine's, row for row. ``work_dir`` holds the cluster's parquet while the driver opens it: on
    a cluster of several nodes it must be a folder every node sees (default: under the request cache's)."""
    config = config or MergeItConfig()
    valid = rows if isinstance(rows, ValidRows) else ValidRows.from_dataset(rows)
    if valid.n_rows == 0:
        raise ValueError("stage 1 needs at least one valid row; the input has none")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    # Each valid row's position (its place among them, in input order) is its source index's place here: the
    # driver's one array that grows with rows (an int64 a row), for the embedding batches and the fit's sample.
    sources = np.sort(_column(valid.data, ROW))
    if valid.given_embeddings:
        data, source = _given(valid.data, config)
    else:
        data, source = _embedded(valid.data, sources, config)
    data = data.materialize()
    seconds["embed"] = _lap(started)

    started = time.perf_counter()
    topics = _fit_topics(data, sources, config)
    data = data.map_batches(_AssignTopics(topics), batch_format="pyarrow").materialize()
    seconds["cluster"] = _lap(started)

    started = time.perf_counter()
    sizes = _topic_sizes(data)
    quotas = allocate_budget(sizes, config.selection_budget, config.per_cluster_budget)
    partitions = _partitions(len(sizes))
    ranked = (
        data.groupby("cluster_id", num_partitions=partitions)
        .map_groups(_select_in_topic, fn_kwargs={"quotas": quotas, "seed": config.seed}, batch_format="pyarrow")
        .materialize()
    )
    seconds["select"] = _lap(started)

    started = time.perf_counter()
    found = (
        ranked.map_batches(_pairable, batch_format="pyarrow")
        .groupby(["cluster_id", "system"], num_partitions=partitions)
        .map_groups(
            _pairs_in_group,
            fn_kwargs={"tau": config.tau, "max_group_size": config.max_group_size},
            batch_format="pyarrow",
        )
    )
    # The files stay while the process runs: the Datasets are memory-mapped views of them.
    folder = Path(tempfile.mkdtemp(prefix="stage1-", dir=_work_root(work_dir)))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    all_rows = _opened(ranked.sort(ROW), folder / "rows", [ROW], None)
    selected = _opened(
        ranked.map_batches(_selected_only, batch_format="pyarrow").sort(ROW),
        folder / "selected",
        [ROW],
        all_rows.features,
    )
    order = ["cluster_id", "system", MATCH_INDEX]
    pairs = _opened(found.sort(order), folder / "pairs", order, _MATCHED_FEATURES).remove_columns(MATCH_INDEX)
    seconds["pair"] = _lap(started)
    plan = _plan(selected, quotas, sizes)
    return Stage1Result(
        all_rows.remove_columns(ROW), selected.remove_columns(ROW), pairs, topics, plan, config, seconds, source
    )


def _work_root(work_dir: str | Path | None) -> Path:
    root = Path(work_dir) if work_dir else default_cache_dir() / "ray-work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _partitions(n_topics: int) -> int:
    """Shuffle partitions for the per-topic steps: a few per CPU of the cluster (Ray's default of 200 costs
    more in tasks than the topics' work on a small cluster), never more than the topics."""
    import ray

    return max(1, min(n_topics, 4 * int(ray.cluster_resources().get("CPU", 1))))


# -- embeddings ---------------------------------------------------------------------------------------


def _given(data: Any, config: MergeItConfig) -> tuple[Any, str]:
    """The input's embeddings, checked by ``given_embeddings``' own rules, batch by batch; normalised only
    when some vector is not of length 1 already (then all are, as the datasets engine does)."""
    from ray.data.aggregate import Max, Min

    expected = embedding_dimension(config.embedding_model)
    checked = data.map_batches(_CheckVectors(expected, config.embedding_model), batch_format="pyarrow").materialize()
    problems = checked.map_batches(_problems_only, batch_format="pyarrow").take_all()
    if problems:  # the first row's, as the datasets engine, reading in order, would meet it
        raise InputError(min(problems, key=lambda found: found[ROW])[_PROBLEM])
    lengths = checked.aggregate(Min("_norm"), Max("_norm_off"))  # one pass for both
    normalise = normalise_needed(lengths["min(_norm)"], lengths["max(_norm_off)"])
    data = checked.map_batches(_Vectors(normalise), batch_format="pyarrow")
    return data, given_source(expected)


_PROBLEM = "_problem"


@dataclass(frozen=True)
class _CheckVectors:
    """Each vector's length and its distance from 1; a batch's problem (ragged, NaN, the wrong width) is
    returned on its first row, not raised: Ray Data replaces a task's exception with its own, so the driver
    raises it with its message."""

    expected: int
    model: str

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems: list[str | None] = [None] * batch.num_rows
        norms = np.ones(batch.num_rows, dtype=np.float32)
        if batch.num_rows:
            try:
                vectors = checked_vectors(batch[EMBEDDING_COLUMN].to_pylist(), "the input")
                check_dimension(vectors.shape[1], self.expected, self.model)
                norms = np.linalg.norm(vectors, axis=1)
            except InputError as problem:
                problems[0] = str(problem)
        return (
            batch.append_column("_norm", pa.array(norms))
            .append_column("_norm_off", pa.array(np.abs(norms - 1)))
            .append_column(_PROBLEM, pa.array(problems, pa.string()))
        )


def _problems_only(batch: pa.Table) -> pa.Table:
    return batch.select([ROW, _PROBLEM]).filter(pc.is_valid(batch[_PROBLEM]))


@dataclass(frozen=True)
class _Vectors:
    normalise: bool

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = matrix(batch[EMBEDDING_COLUMN])
        batch = batch.drop_columns(["_norm", "_norm_off", _PROBLEM, EMBEDDING_COLUMN])
        vectors = unit_vectors(vectors) if self.normalise else vectors
        return batch.append_column(EMBEDDING_COLUMN, _vector_column(vectors))


def _vector_column(vectors: np.ndarray) -> pa.Array:
    rows, width = vectors.shape if vectors.ndim == 2 else (len(vectors), 0)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * width), flat, type=_VECTOR)


class _EmbeddingActor:
    """One embedding model per actor; one embedding batch of rows in, in input order, with ``embedding`` out."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.sort_by(ROW).drop_columns([_EMBED_BATCH])
        texts = {column: batch[column].to_pylist() for column in self.embedder.text_columns}
        vectors = np.asarray(self.embedder(texts)[EMBEDDING_COLUMN], dtype=np.float32)
        return batch.append_column(EMBEDDING_COLUMN, _vector_column(vectors))


@dataclass(frozen=True)
class _EmbedBatchOf:
    sources: np.ndarray  # every valid row's source index, ascending

    def __call__(self, batch: pa.Table) -> pa.Table:
        positions = np.searchsorted(self.sources, batch[ROW].to_numpy())
        return batch.append_column(_EMBED_BATCH, pa.array(positions // EMBED_BATCH_ROWS))


def _embedded(data: Any, sources: np.ndarray, config: MergeItConfig) -> tuple[Any, str]:
    """Embedded by an actor pool in the datasets engine's batches (rows 0-1023, 1024-2047, ... of the valid
    rows): the model pads a batch to its longest text, so other batches would change the vectors in their
    last digits, and a tie in the selection with them."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = max(1, gpus or int(ray.cluster_resources().get("CPU", 1)) // 2)
    embedder = Embedder(config.embedding_model, config.text_columns, config.embedding_batch_size)
    data = (
        data.map_batches(_EmbedBatchOf(sources), batch_format="pyarrow")
        .groupby(_EMBED_BATCH, num_partitions=_partitions(-(-len(sources) // EMBED_BATCH_ROWS)))
        .map_groups(
            _EmbeddingActor,
            fn_constructor_args=(embedder,),
            compute=ray.data.ActorPoolStrategy(size=size),
            batch_format="pyarrow",
            num_gpus=1 if gpus else 0,
        )
    )
    device = "GPU" if gpus else "CPU"
    return data, f"{config.embedding_model} on Ray ({size} {device} actors)"


# -- topics and selection -----------------------------------------------------------------------------


def _fit_topics(data: Any, sources: np.ndarray, config: MergeItConfig) -> TopicClusters:
    """The datasets engine's fit: the rows at the positions ``read_rows`` picks, their embeddings gathered to
    the driver into one array in their order (filled in place: the sample is the driver's largest array)."""
    n_rows = len(sources)
    positions = read_rows(n_rows, config)
    wanted = sources[positions]

    def keep(batch: pa.Table) -> pa.Table:
        mask = np.isin(batch[ROW].to_numpy(), wanted)
        return batch.select([ROW, EMBEDDING_COLUMN]).filter(pa.array(mask))

    gathered: np.ndarray | None = None
    filled = 0
    for batch in data.map_batches(keep, batch_format="pyarrow").iter_batches(batch_format="pyarrow", batch_size=None):
        vectors = matrix(batch[EMBEDDING_COLUMN])
        if gathered is None:
            gathered = np.empty((len(wanted), vectors.shape[1]), dtype=np.float32)
        gathered[np.searchsorted(wanted, batch[ROW].to_numpy())] = vectors
        filled += batch.num_rows
    if gathered is None or filled != len(wanted):
        raise RuntimeError(f"the topic fit asked the cluster for {len(wanted)} embeddings and got {filled}")

    def embeddings_at(rows: np.ndarray) -> np.ndarray:
        # The fit's own rows are the sample itself (no copy); the PCA's are a subset of it.
        return gathered if np.array_equal(rows, positions) else gathered[np.searchsorted(positions, rows)]

    return fit_from_sample(embeddings_at, n_rows, config)


def _column(data: Any, name: str) -> np.ndarray:
    batches = data.select_columns([name]).iter_batches(batch_format="pyarrow", batch_size=None)
    return np.concatenate([batch[name].to_numpy() for batch in batches])


@dataclass(frozen=True)
class _AssignTopics:
    topics: TopicClusters

    def __call__(self, batch: pa.Table) -> pa.Table:
        clusters = self.topics.assign(matrix(batch[EMBEDDING_COLUMN])).astype(np.int32)
        return batch.append_column("cluster_id", pa.array(clusters, pa.int32()))


def _topic_sizes(data: Any) -> dict[int, int]:
    counts = data.groupby("cluster_id").count().take_all()
    return {int(row["cluster_id"]): int(row["count()"]) for row in sorted(counts, key=lambda r: r["cluster_id"])}


def _select_in_topic(group: pa.Table, quotas: dict[int, int], seed: int) -> pa.Table:
    group = group.sort_by(ROW)  # the datasets engine's order inside a topic
    ranks = np.full(group.num_rows, -1, dtype=np.int64)
    ranking = facility_location_ranking(matrix(group[EMBEDDING_COLUMN]), quotas[group["cluster_id"][0].as_py()], seed)
    ranks[np.asarray(ranking, dtype=np.int64)] = np.arange(len(ranking))
    return group.append_column("selected", pa.array(ranks >= 0)).append_column("selection_rank", pa.array(ranks))


def _selected_only(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["selected"])


def _plan(selected: Dataset, quotas: dict[int, int], sizes: dict[int, int]) -> SelectionPlan:
    table = selected.with_format("arrow", columns=["id", "selection_rank"])[:]
    ranks = dict(zip(table["id"].to_pylist(), table["selection_rank"].to_pylist(), strict=True))
    return SelectionPlan(ranks, quotas, sizes)


# -- pairs --------------------------------------------------------------------------------------------


def _pairable(batch: pa.Table) -> pa.Table:
    """Selected rows that may pair: multi-turn conversations are kept whole, never merged."""
    return batch.filter(pc.and_(batch["selected"], pc.invert(batch["multi_turn"])))


def _pairs_in_group(group: pa.Table, tau: float, max_group_size: int) -> pa.Table:
    group = group.sort_by(ROW)
    matches = [
        PairMatch(tuple(members), score)
        for members, score in match_cluster(matrix(group[EMBEDDING_COLUMN]), tau, max_group_size)
    ]
    source = {name: group[name].to_pylist() for name in SOURCE_COLUMNS}
    table = pa.Table.from_pydict(pair_columns(matches, source), schema=PAIR_FEATURES.arrow_schema)
    return table.append_column(MATCH_INDEX, pa.array(np.arange(len(matches), dtype=np.int64)))


# -- written by the cluster, opened on the driver -----------------------------------------------------

_WRITTEN = pa.schema([("path", pa.string()), ("first", pa.string())])
_FILE_BATCH_ROWS = 1000  # the record batches of an Arrow file: what datasets reads at a time


@dataclass(frozen=True)
class _ArrowFile:
    """One batch of a sorted Ray dataset (one range of its order) written as one Arrow stream file, the
    format ``Dataset.from_file`` memory-maps: the driver opens the cluster's rows without reading them.
    Returns the file's path and its first row's sort key (JSON)."""

    folder: str
    order: tuple[str, ...]
    schema: pa.Schema | None  # features' schema, with datasets' metadata; else the batch's own

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return _WRITTEN.empty_table()
        if self.schema is not None:
            batch = batch.select(self.schema.names).cast(self.schema)
        path = f"{self.folder}/{uuid.uuid4().hex}.arrow"
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch, max_chunksize=_FILE_BATCH_ROWS)
        first = json.dumps([batch[name][0].as_py() for name in self.order])
        return pa.table({"path": [path], "first": [first]}, schema=_WRITTEN)


def _opened(data: Any, folder: Path, order: list[str], features: Features | None) -> Dataset:
    """A sorted Ray dataset written by the cluster as Arrow files and opened as one memory-mapped Dataset
    (of ``features`` where given): each file holds one range of the sort, so the files in the order of their
    first rows are the whole order. The driver gets one small record a file."""
    folder.mkdir()
    schema = features.arrow_schema if features is not None else None
    writer = _ArrowFile(str(folder), tuple(order), schema)
    written = data.map_batches(writer, batch_size=None, batch_format="pyarrow").take_all()
    unseen = [file["path"] for file in written if not Path(file["path"]).is_file()]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} of the {len(written)} files the cluster wrote are not in {folder} on this machine "
            f"(the first: {unseen[0]}): put the work folder (--cache-dir) on storage every node sees"
        )
    if not written:
        if features is None:
            raise RuntimeError(f"the cluster wrote no rows to {folder}")
        return Dataset.from_dict({name: [] for name in features}, features=features)
    written.sort(key=lambda file: json.loads(file["first"]))
    parts = [Dataset.from_file(file["path"]) for file in written]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _lap(started: float) -> float:
    return time.perf_counter() - started
