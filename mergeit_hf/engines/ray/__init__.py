"""The Ray engine: the same stages on Ray Data, for data or endpoints beyond one machine.

``session`` joins the cluster; ``stage1`` embeds, assigns topics, selects and pairs on Ray Data; ``stage2``
streams the pairs through a pool of ``merge_actor``s, which get their settings and keys from ``travel``.
Every algorithm is the stage modules' own (``Embedder``, ``TopicClusters.assign``, ``facility_location_ranking``,
``match_cluster``, ``Merger``); these modules only move rows to them and back, in input order
(``stage1.POSITION``), so both engines agree row for row.
"""

from mergeit_hf.engines.ray.session import ray_session
from mergeit_hf.engines.ray.stage1 import run_stage1_ray
from mergeit_hf.engines.ray.stage2 import merge_stage_ray

__all__ = ["merge_stage_ray", "ray_session", "run_stage1_ray"]
