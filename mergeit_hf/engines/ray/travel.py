"""What a merge actor needs, resolved on the driver: Ray workers do not inherit the driver's environment, so
an actor that read ``MERGEIT_*`` itself would use the worker's values (or none) and, say, let the merge model
score where the driver named a scorer endpoint.

Endpoints, models and the cache folder travel inside the actor's ``Merger``. Keys travel through Ray's
object store (``ray.put`` on the driver, ``ray.get`` in the actor): not in the runtime environment's
``env_vars`` nor among task arguments, both of which Ray's dashboard and state API show (ray-project/ray
#28276), and never in the card or logs.
"""

from __future__ import annotations

import os

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.sending.request_cache import default_cache_dir
from mergeit_hf.stage2.merge.merger import Merger

#: Read by ``Merger`` when a value is not given: removed in the actors, so a worker's own value never applies.
SETTING_VARIABLES = ("MERGEIT_ENDPOINT", "MERGEIT_MODEL", "MERGEIT_SCORER_ENDPOINT", "MERGEIT_CACHE")
#: Read when requests are sent (``api_key``): the driver's values, removed where the driver has none.
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
    return Merger(
        merger.resolved_endpoint, config, cache_dir, merger.use_cache, share_fixed_limit=False, shared_cache=True
    )


def actor_keys() -> dict[str, str]:
    """The driver's keys, for the actors: its variables, and its saved HF login as ``HF_TOKEN`` (a worker on
    another node has no such login, or another user's)."""
    from huggingface_hub import get_token

    keys = {variable: os.environ[variable] for variable in KEY_VARIABLES if os.environ.get(variable)}
    if "HF_TOKEN" not in keys and (login := get_token()):
        keys["HF_TOKEN"] = login
    return keys


def apply_keys(keys: dict[str, str]) -> None:
    """In an actor: the driver's keys in, the worker's own keys and settings out. Where the driver had no key
    at all, a saved HF login on the worker's node can still apply (``api_key``'s last resort)."""
    for variable in (*SETTING_VARIABLES, *KEY_VARIABLES):
        os.environ.pop(variable, None)
    os.environ.update(keys)
