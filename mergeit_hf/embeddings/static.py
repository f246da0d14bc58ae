"""A static embedding model for retention, distilled once from the stage 1 model (model2vec's method).

Retention embeds every source part and merged passage of every merge. A transformer on the client's CPU
cannot keep up with a large endpoint (MiniLM on 2 cores: ~100 texts/s, while a 128-slot server returns
~60 merges/s), so retention reads a static model instead: one vector per word piece, a text being the
normalised mean of its pieces' vectors. Encoding is a tokenizer call and a sum, thousands of texts a second.

The vectors are model2vec's distillation of the stage 1 model: each vocabulary piece run through the model
alone (``[CLS] piece [SEP]``, mean-pooled), PCA to 256 dimensions, weighted by Zipf-estimated SIF. It is
written here (about 20 lines) because ``model2vec.distill`` pins ``transformers<5.4``, which this project's
sentence-transformers excludes; model2vec's ``StaticModel`` encodes, saves and loads the result. The folder
is cached in ``MERGEIT_STATIC_CACHE`` (default ~/.cache/mergeit-hf/static), keyed by the source model's
path and files, and reused by every later run (distilling takes about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergeit_hf.embeddings.embedder import resolve_model_path

if TYPE_CHECKING:
    from model2vec import StaticModel

PCA_DIMENSIONS = 256
SIF_COEFFICIENT = 1e-4  # model2vec's default
_TOKENS_PER_PASS = 1024


def static_cache_dir() -> Path:
    """Apart from the request cache (``MERGEIT_CACHE``), which runs and tests often point elsewhere."""
    return Path(os.environ.get("MERGEIT_STATIC_CACHE") or Path.home() / ".cache" / "mergeit-hf" / "static")


def _source_key(model_path: str) -> str:
    """Changes when the source model's files change, so an edited model is distilled again."""
    folder = Path(model_path)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    stamp = "".join(f"{p.relative_to(folder)}:{p.stat().st_size};" for p in files) or model_path
    return hashlib.sha256(f"{model_path}|{stamp}|{PCA_DIMENSIONS}|{SIF_COEFFICIENT}".encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def load_static_model(model: str) -> StaticModel:
    """The static model distilled from ``model`` (a sentence-transformers name or folder), from the cache
    or distilled now and cached."""
    from model2vec import StaticModel

    path = resolve_model_path(model)
    folder = static_cache_dir() / f"{Path(model).name}-{_source_key(path)}"
    if not (folder / "model.safetensors").is_file():
        publish_folder(distill(path), folder)
    return StaticModel.from_pretrained(str(folder))


def publish_folder(model: StaticModel, folder: Path) -> None:
    """Save ``model`` as ``folder`` atomically: written to a folder of its own, then renamed. Two processes
    distilling at once both succeed; the first rename wins and the other's copy is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp))
        tmp.replace(folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise  # not a lost race: a real failure to write the cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def distill(model_path: str) -> StaticModel:
    """model2vec's distillation of a sentence-transformers model whose first module is a HF transformer."""
    import torch
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer
    from sklearn.decomposition import PCA
    from tokenizers import Tokenizer

    encoder = SentenceTransformer(model_path, device="cpu")
    hf_tokenizer = encoder.tokenizer
    transformer = encoder[0].auto_model.eval()
    vocabulary = sorted(hf_tokenizer.get_vocab().items(), key=lambda item: item[1])
    ids = [token_id for _, token_id in vocabulary]
    cls, sep = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(ids), _TOKENS_PER_PASS):
            chunk = torch.tensor([[cls, token_id, sep] for token_id in ids[start : start + _TOKENS_PER_PASS]])
            hidden = transformer(input_ids=chunk, attention_mask=torch.ones_like(chunk)).last_hidden_state
            vectors.append(hidden.mean(dim=1).numpy())
    embeddings = np.nan_to_num(np.concatenate(vectors))
    embeddings = PCA(n_components=min(PCA_DIMENSIONS, embeddings.shape[1]), random_state=0).fit_transform(embeddings)
    # Zipf's law on the vocabulary order stands in for token frequencies; SIF weighs common pieces down.
    probability = 1 / np.arange(2, len(embeddings) + 2)
    probability /= probability.sum()
    embeddings = embeddings * (SIF_COEFFICIENT / (SIF_COEFFICIENT + probability))[:, None]
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    config = {"model_type": "model2vec", "hidden_dim": embeddings.shape[1], "normalize": True, "seq_length": 1_000_000}
    return StaticModel(
        vectors=embeddings.astype(np.float32),
        tokenizer=tokenizer,
        config=config,
        base_model_name=Path(model_path).name,
        normalize=True,
    )


class StaticEmbedder:
    """``encode(texts)``: L2-normalised static embeddings, the interface ``Embedder`` offers."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._static = load_static_model(model)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._static.dim), dtype=np.float32)
        # One process: model2vec spawns workers only past 10k texts, and merges send far fewer at once. It
        # normalises itself (a text with no known piece stays the zero vector).
        return self._static.encode(texts, show_progress_bar=False, use_multiprocessing=False, normalize=True)
