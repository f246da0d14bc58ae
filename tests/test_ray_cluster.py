"""Issue 25: stage 2 streams through merge actors on a real two-node Ray cluster whose workers were started
without the driver's variables; settings travel with the job, and a killed actor costs one batch.

The cluster (``ray.cluster_utils.Cluster``: a head and a second node, one CPU each, each its own raylet) is
started before the driver sets ``MERGEIT_SCORER_ENDPOINT``, so no worker has it; the CLI joins it with
``--ray-address``, as a user joins theirs. Two merge actors (``--merge-actors 2``; the default on two CPUs
is one) share the endpoint, so the pool's batches run side by side and their counts must add up.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mergeit_hf.output.folder import OutputFolder
from mergeit_hf.run.cli import main
from tests.conftest import shared
from tests.helpers.pairs import restating_scripts
from tests.helpers.scripted import ScriptedServer, TgiScorer

N_ROWS = 600
ACTOR_TITLE = b"MapBatches(MergeActor)"  # in the process title Ray gives a merge actor
TWO_ACTORS = ["--merge-actors", "2"]
KEY = "sk-driver-only-7f3a"


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # a local Ray another test module started
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("MERGEIT_")]:
            patch.delenv(name)  # the nodes' workers start without any of them
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> tuple[list[dict], Path]:
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:N_ROWS]
    folder = tmp_path_factory.mktemp("cluster")
    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "config.yaml").write_text("scorer_check_rows: 0\nn_clusters: 12\nselection_budget: 0.5\ntau: 0.55\n")
    return rows, folder


def _run(folder: Path, name: str, merges: ScriptedServer, engine: list[str]) -> OutputFolder:
    out = folder / name
    args = ["run", str(folder / "rows.json"), "--output", str(out), "--endpoint", merges.url]
    args += ["--config", str(folder / "config.yaml"), "--cache-dir", str(folder / f"cache-{name}"), *engine]
    assert main(args) == 0
    return OutputFolder.open(out)


def _no_scores_here(instruction: str, output: str) -> dict:
    raise AssertionError("a quality score reached the merge endpoint although the driver set a scorer endpoint")


def test_the_driver_s_scorer_endpoint_reaches_every_actor(cluster, rows, monkeypatch):
    import ray

    data, folder = rows
    merge, score = restating_scripts(data)
    # Answers slow enough that the first actor is still on its two batches when the second actor is up (Ray
    # Data starts a pool's actors without waiting for them all).
    merges = ScriptedServer(merge, _no_scores_here, slots=8, latency_s=2.0, required_key=KEY).start()
    scorer = TgiScorer(score, cap=20).start()
    monkeypatch.setenv("MERGEIT_SCORER_ENDPOINT", scorer.url)  # the driver's only: the workers never had it
    monkeypatch.setenv("MERGEIT_API_KEY", KEY)  # so is the key the merge server asks for
    environments: dict[int, bytes] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_actor_environments, args=(environments, stop), daemon=True)
    watcher.start()
    try:
        on_ray = _run(folder, "ray", merges, ["--engine", "ray", "--ray-address", cluster.address, *TWO_ACTORS])
        stop.set()
        assert len([n for n in ray.nodes() if n.get("Alive")]) == 2  # the run joined the two-node cluster
        scored_on_ray, merged_on_ray = len(scorer.posted), dict(merges.requests)
        plain = _run(folder, "datasets", merges, [])
    finally:
        merges.stop()
        scorer.stop()
    pairs = len(on_ray.pairs)
    # The key reached every actor (no request refused) and shows nowhere: card, run.json, the actors' start.
    assert pairs >= 10 and merged_on_ray == {"merge": pairs}  # merges only: not one score at the merge endpoint
    assert scored_on_ray >= 3 * pairs  # a, b and the merge of every pair, at the scorer endpoint
    assert set(on_ray.pairs["quality_model"]) == {"scripted/deita-quality-scorer"}
    # Both actors merged (each actor's reports name it), and the run's counts are the servers': every
    # actor's batches added up.
    assert on_ray.record.requests["sent"] == pairs + scored_on_ray
    assert on_ray.record.requests["by_role"] == {"merge": pairs, "score": scored_on_ray}
    assert on_ray.record.endpoints["merge"]["requests"].startswith(f"{pairs} ")
    assert "in the 2 merge actor(s)" in on_ray.record.endpoints["merge"]["concurrency"]
    written = "".join(p.read_text() for p in (on_ray.folder / "README.md", on_ray.folder / "mergeit" / "run.json"))
    assert KEY not in written
    assert len(environments) == 2 and not any(KEY.encode() in env for env in environments.values())
    decisions = ["pair_id", "merge_status", "merge_reason", "quality_merged", "merged_output"]
    assert on_ray.pairs.select_columns(decisions).to_list() == plain.pairs.select_columns(decisions).to_list()
    assert on_ray.final["id"] == plain.final["id"] and on_ray.record.counts == plain.record.counts


def _watch_actor_environments(seen: dict[int, bytes], stop: threading.Event) -> None:
    """The environment each merge actor's process was started with (``/proc/PID/environ``): where the runtime
    environment's ``env_vars`` go, and what Ray's dashboard shows of them."""
    while not stop.wait(0.2):
        for pid in _merge_actor_pids():
            try:
                seen.setdefault(pid, Path(f"/proc/{pid}/environ").read_bytes())
            except OSError:  # ended while read
                continue


def _merge_actor_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and ACTOR_TITLE in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # a process that ended while listed
            continue
    return found


def _kill_one_actor_after(merges: ScriptedServer, requests: int, killed: list[int]) -> None:
    before = set(_merge_actor_pids())  # an actor left by another run is not this run's
    deadline = time.monotonic() + 300
    while sum(merges.requests.values()) < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [pid for pid in _merge_actor_pids() if pid not in before]
    if pids:
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])


def test_a_killed_actor_costs_one_batch_and_every_pair_is_merged_once(cluster, rows):
    data, folder = rows
    merge, score = restating_scripts(data)
    # Slow answers: stage 2 lasts long enough for the kill to land among batches still in flight.
    merges = ScriptedServer(merge, score, slots=4, latency_s=0.2).start()
    killed: list[int] = []
    killer = threading.Thread(target=_kill_one_actor_after, args=(merges, 12, killed), daemon=True)
    killer.start()
    try:
        out = _run(folder, "killed", merges, ["--engine", "ray", "--ray-address", cluster.address, *TWO_ACTORS])
    finally:
        merges.stop()
    killer.join(5)
    assert len(killed) == 1, "no merge actor was found to kill"
    ids = out.pairs["pair_id"]
    assert len(ids) == len(set(ids)) >= 10  # every pair once
    assert set(out.pairs["merge_status"]) == {"accepted"}, set(out.pairs["merge_reason"])
    # A pair costs 4 requests (the merge, three scores). The dead actor's batches ran again from the cache:
    # only what was in flight when it died (at most the server's 4 slots) is sent twice, not a batch's 64.
    assert sum(merges.requests.values()) <= 4 * len(ids) + 4
    deadline = time.monotonic() + 60
    while _merge_actor_pids() and time.monotonic() < deadline:  # the pool ends with the stage
        time.sleep(0.5)
    assert _merge_actor_pids() == []
