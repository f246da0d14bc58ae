"""What a merge actor needs, resolved on the driver: Ray workers do not inherit the driver's environment, so
an actor that read ``MERGEIT_*`` itself would use the worker's values (or none) and, say, let the merge model
score where the driver named a scorer endpoint.

Endpoints, models and the cache folder travel inside the actor's ``Merger``; keys travel as the actor's
runtime environment (never as task arguments, which the dashboard shows, nor in the card or logs).
"""

from __future__ import annotations

import os

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.sending.request_cache import default_cache_dir
from mergeit_hf.stage2.merge.merger import Merger

#: Read by ``Merger`` when a value is not given: blanked in the actors, so a worker's own value never applies.
SETTING_VARIABLES = ("MERGEIT_ENDPOINT", "MERGEIT_MODEL", "MERGEIT_SCORER_ENDPOINT", "MERGEIT_CACHE")
#: Read when requests are sent (``api_key``): the driver's values, or blank where the driver has none.
KEY_VARIABLES = ("MERGEIT_API_KEY", "MERGEIT_SCORER_API_KEY", "MERGEIT_JUDGE_API_KEY", "HF_TOKEN")


def merger_for_actors(merger: Merger, concurrency: int | None) -> Merger:
    """``merger`` with everything it would read from this process's environment written in, and each actor's
    share of the endpoint's concurrency (None: each actor's limit adapts)."""
    changes: dict[str, object] = {
        "model": merger.resolved_model,
        "scorer_endpoint": merger.resolved_scorer_endpoint,
    }
    if concurrency is not None:
        changes["concurrency"] = concurrency
    config = MergeItConfig.from_dict({**merger.config.to_dict(), **changes})
    cache_dir = str(merger.cache_dir or default_cache_dir()) if merger.use_cache else None
    # Each actor has its share already: it must not split it again with the other actors on its node.
    return Merger(merger.resolved_endpoint, config, cache_dir, merger.use_cache, share_fixed_limit=False)


def actor_environment() -> dict[str, str]:
    """The actors' runtime environment: the driver's keys (its saved HF login as ``HF_TOKEN``, which a
    worker on another node lacks) and every setting variable blanked."""
    from huggingface_hub import get_token

    environment = dict.fromkeys(SETTING_VARIABLES, "")
    for variable in KEY_VARIABLES:
        environment[variable] = os.environ.get(variable, "")
    if not environment["HF_TOKEN"]:
        environment["HF_TOKEN"] = get_token() or ""
    return environment
