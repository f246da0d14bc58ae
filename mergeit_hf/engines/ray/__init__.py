"""The Ray engine: the same stages on Ray Data, for data or endpoints beyond one machine.

``session`` joins the cluster; ``reading`` has the cluster read and check a parquet input; ``stage1`` embeds,
assigns topics, selects and pairs in the cluster and writes the results for the driver to open; ``stage2``
streams the pairs through a pool of ``merge_actor``s, which get their settings and keys from ``travel``.
Every algorithm is the input and stage modules' own (``check_candidate``, ``Embedder``, ``TopicClusters.assign``,
``facility_location_ranking``, ``match_cluster``, ``Merger``); these modules only move rows to them and back,
in input order (``source_index``), so both engines agree row for row.
"""

from mergeit_hf.engines.ray.reading import ValidRows, cluster_readable, read_on_cluster
from mergeit_hf.engines.ray.session import ray_session
from mergeit_hf.engines.ray.stage1 import run_stage1_ray
from mergeit_hf.engines.ray.stage2 import merge_stage_ray

__all__ = ["ValidRows", "cluster_readable", "merge_stage_ray", "ray_session", "read_on_cluster", "run_stage1_ray"]
