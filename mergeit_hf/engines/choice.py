"""Which engine runs the stages: ``datasets`` (one machine, the default) or ``ray`` (a Ray cluster, or a
local Ray). Both take the same rows and config and return the same results; Ray is imported only when
chosen, so it stays an optional extra (``pip install 'mergeit-hf[ray]'``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.engines import datasets_engine
from mergeit_hf.errors import ConfigError
from mergeit_hf.inputs.loading import InputFormat, LoadReport, load_rows
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import MergeBatch

EngineName = Literal["datasets", "ray"]
ENGINES: tuple[EngineName, ...] = ("datasets", "ray")


@dataclass(frozen=True)
class Engine:
    """name: "datasets" or "ray"; ray_address: the cluster to join (else ``RAY_ADDRESS``, else a local Ray);
    merge_actors: how many Ray actors split the merge endpoint (else half the cluster's CPUs; one with the
    embedded model)."""

    name: EngineName = "datasets"
    ray_address: str | None = None
    merge_actors: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"engine must be one of {list(ENGINES)}, got {self.name!r}")
        if self.ray_address and self.name != "ray":
            raise ConfigError("a Ray address was given but the engine is 'datasets': add --engine ray")
        if self.merge_actors is not None and (self.name != "ray" or self.merge_actors < 1):
            raise ConfigError(f"--merge-actors takes a count of 1 or more with --engine ray, got {self.merge_actors}")

    def start(self) -> str:
        """Start (or join) what the engine runs on; a line saying what that is (also ``description``)."""
        if self.name == "datasets":
            return "engine: datasets, on this machine"
        try:
            from mergeit_hf.engines.ray import ray_session
        except ImportError as exc:
            raise ConfigError(f"--engine ray needs Ray Data: pip install 'mergeit-hf[ray]' ({exc})") from None
        return "engine: " + ray_session(self.ray_address)

    @property
    def shares_cache(self) -> bool:
        """The request cache is written by many processes, maybe on many nodes over a network filesystem (a
        Ray job's driver and actors): one append-only file per writer (``SharedRequestCache``), not SQLite."""
        return self.name == "ray"

    @property
    def description(self) -> str:
        """What the run record and the card say ran the stages."""
        if self.name == "datasets":
            return "datasets"
        from mergeit_hf.engines.ray import ray_session

        return ray_session(self.ray_address)  # joined already: only describes it

    def load(
        self,
        source: str | Path | Dataset,
        *,
        input_format: InputFormat = "auto",
        column_map: Mapping[str, str] | None = None,
        on_driver: bool = False,
    ) -> tuple[Any, LoadReport]:
        """The validated rows and what reading found. With Ray, a parquet file is read and checked by the
        cluster (the rows stay there, for ``run_stage1``); other sources, and rows needed on the driver
        (``on_driver``: the prefilter scores them there), are read by ``load_rows`` into a Dataset."""
        if self.name == "ray" and not on_driver:
            from mergeit_hf.engines.ray import cluster_readable, read_on_cluster

            if (path := cluster_readable(source)) is not None:
                return read_on_cluster(path, input_format, column_map)
        return load_rows(source, input_format=input_format, column_map=column_map)

    def run_stage1(self, rows: Any, config: MergeItConfig) -> Stage1Result:
        """Stage 1 over what ``load`` returned (or any validated Dataset)."""
        if self.name == "datasets":
            return datasets_engine.run_stage1(rows, config)
        from mergeit_hf.engines.ray import run_stage1_ray

        return run_stage1_ray(rows, config)

    def merge_stage(self, pairs: Dataset, merger: Merger, max_pairs: int | None = None) -> tuple[Dataset, MergeBatch]:
        if self.name == "datasets":
            return datasets_engine.merge_stage(pairs, merger, max_pairs)
        from mergeit_hf.engines.ray import merge_stage_ray

        return merge_stage_ray(pairs, merger, max_pairs, self.merge_actors)
