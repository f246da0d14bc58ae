"""Joining a Ray cluster (or starting a local Ray) for the Ray engine."""

from __future__ import annotations

import logging
import os


def ray_session(address: str | None = None) -> str:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local Ray; a line saying which."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    import ray.data

    # Ray Data's per-operator progress lines would bury the run's own output; its logs stay in the session.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    resources = ray.cluster_resources()
    where = f"cluster at {address}" if address else "a local Ray"
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    gpus = int(resources.get("GPU", 0))
    return f"Ray {ray.__version__} on {where}: {nodes} node(s), {int(resources.get('CPU', 0))} CPUs, {gpus} GPUs"
