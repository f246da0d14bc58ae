"""Shared fixtures: real data from ../shared/data, the real embedding model, a real llama.cpp server."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeit_hf import MergeItConfig, load_rows, run_stage1
from tests.helpers.servers import FaultProxy, LlamaServer

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"real test data missing: {path} (the suite expects ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def roleplay_rows():
    """400 real GPTeacher roleplay rows (long and short, empty inputs, quotes)."""
    rows, _ = load_rows(shared("gpteacher_roleplay.json"))
    return rows.select(range(400))


@pytest.fixture(scope="session")
def small_config() -> MergeItConfig:
    return MergeItConfig(n_clusters=12, selection_budget=0.5, tau=0.55, seed=7)


@pytest.fixture(scope="session")
def roleplay_stage1(roleplay_rows, small_config):
    return run_stage1(roleplay_rows, small_config)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.fail("HF_HUB_OFFLINE is set: it blocks InferenceClient calls to localhost too; unset it")
    server = LlamaServer.start(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(llama_server):
    # Requests an earlier test abandoned still run on the one-slot server; these tests count and time theirs.
    llama_server.wait_idle()
    proxy = FaultProxy(llama_server.url).start()
    yield proxy
    proxy.stop()
