"""Arrow readers for the columns every stage scans: embeddings as float32 matrices (in chunks or at given
positions) and whole columns as lists, read as Arrow buffers with no Python object per value."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset

#: Rows per chunk when a stage streams the embedding column.
STREAM_CHUNK_ROWS = 8192


def iter_embeddings(dataset: Dataset, chunk_rows: int = STREAM_CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Embeddings in chunks, so the whole matrix never has to be in memory at once; read as Arrow buffers
    (no Python object per value: a million rows scan in well under a second)."""
    view = dataset.with_format("arrow", columns=["embedding"])
    for start in range(0, len(dataset), chunk_rows):
        yield matrix(view[start : start + chunk_rows]["embedding"])


def column_values(dataset: Dataset, name: str) -> list:
    """A whole column as a Python list, read through Arrow (``dataset[name]`` is a lazy column in datasets 4+,
    and indexing it row by row costs a table lookup each time)."""
    return arrow_columns(dataset, [name])[name].to_pylist()


def arrow_columns(dataset: Dataset, names: list[str]) -> pa.Table:
    """Whole columns as one Arrow table, in the dataset's row order: no Python object per value."""
    return dataset.with_format("arrow", columns=names)[:]


def take_embeddings(dataset: Dataset, rows: np.ndarray) -> np.ndarray:
    """The embeddings of the rows at these positions, as one float32 matrix."""
    return matrix(dataset.with_format("arrow", columns=["embedding"])[rows]["embedding"])


def matrix(column: Any) -> np.ndarray:
    """Equal-length vectors as one (rows, dim) float32 matrix: an Arrow list column (or chunked column) as
    datasets reads it, or what Ray Data hands a batch over as (an object array of arrays, or a 2-D tensor)."""
    if isinstance(column, np.ndarray):
        if column.dtype != object:
            return column.astype(np.float32, copy=False)
        return np.stack(list(column)).astype(np.float32, copy=False) if len(column) else np.zeros((0, 0), np.float32)
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(array) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), -1).astype(np.float32, copy=False)
