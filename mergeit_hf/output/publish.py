"""Write the dataset repository (parquet shards, README.md card, mergeit/ extras) to a folder or the Hub.

Both targets get the same layout, so ``datasets.load_dataset(folder)`` on a local export loads exactly
what the Hub repo serves. On the Hub everything lands in ONE ``HfApi.create_commit``: data and card
arrive together, so the card can never be overwritten by a later data upload (``Dataset.push_to_hub``
writes its own README.md), and stale shards of an earlier push are deleted in the same commit.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi

from mergeit_hf.endpoints.http.transport import redact
from mergeit_hf.errors import MergeItError
from mergeit_hf.progress import datasets_bars_off

MAX_SHARD_BYTES = 500 * 1024 * 1024
EXTRAS_FOLDER = "mergeit"


def write_repo_folder(
    folder: str | Path,
    dataset: Dataset,
    card: DatasetCard,
    extras: dict[str, Dataset] | None = None,
    run_record: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> list[Path]:
    """Write the repository layout; returns the files written, relative to ``folder``.

    ``files`` maps repo paths to bytes (the card's images) written as they are.
    """
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for stale in (folder / "data").glob("train-*.parquet"):
        stale.unlink()
    written = []
    n_shards = max(1, math.ceil(dataset.data.nbytes / MAX_SHARD_BYTES))
    parquet = {
        Path("data") / f"train-{i:05d}-of-{n_shards:05d}.parquet": dataset.shard(n_shards, i, contiguous=True)
        for i in range(n_shards)
    }
    parquet |= {Path(EXTRAS_FOLDER) / f"{name}.parquet": extra for name, extra in (extras or {}).items()}
    (folder / EXTRAS_FOLDER).mkdir(exist_ok=True)
    with datasets_bars_off():  # a bar per file written would follow the run's own summary
        for relative, part in parquet.items():
            part.to_parquet(str(folder / relative))
            written.append(relative)
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    written.append(Path("README.md"))
    for name, content in sorted((files or {}).items()):
        relative = Path(name)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
        written.append(relative)
    if run_record is not None:
        relative = Path(EXTRAS_FOLDER) / "run.json"
        # No sort_keys: the counts keep the pipeline's order when the card is rendered again.
        (folder / relative).write_text(json.dumps(run_record, indent=2), encoding="utf-8")
        written.append(relative)
    return written


def push_to_hub(
    dataset: Dataset,
    repo_id: str,
    card: DatasetCard,
    *,
    extras: dict[str, Dataset] | None = None,
    run_record: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload MergeIT-curated dataset with mergeit-hf",
    api: HfApi | None = None,
) -> Any:
    """Create (or reuse) the dataset repo and commit data, card and extras in one commit.

    The token comes from the argument, ``HF_TOKEN`` or the HF login; it is never written anywhere
    and is removed from any error message.
    """
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, repo_type="dataset"))
        with tempfile.TemporaryDirectory() as staging:
            written = write_repo_folder(staging, dataset, card, extras, run_record, files)
            paths = {path.as_posix() for path in written}
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=path.as_posix(), path_or_fileobj=str(Path(staging) / path))
                for path in written
            ]
            operations += [
                CommitOperationDelete(path_in_repo=path)
                for path in sorted(existing)
                if path.startswith("data/") and path not in paths
            ]
            return api.create_commit(
                repo_id=repo_id, repo_type="dataset", operations=operations, commit_message=commit_message
            )
    except MergeItError:
        raise
    except Exception as exc:  # huggingface_hub raises many HTTP error types; name the repo, hide the token
        raise MergeItError(f"publishing to the Hub repo {repo_id!r} failed: {redact(str(exc), token)}") from None
