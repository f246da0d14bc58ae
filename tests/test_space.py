"""The demo Space: its named API through gradio_client, and a real click-through in headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.servers import free_port, wait_for_http

SPACE = Path(__file__).resolve().parent.parent / "spaces" / "mergeit-demo"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("space") / "space.log"
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MERGEIT_CACHE": str(log.parent / "cache"),
    }
    env.pop("MERGEIT_ENDPOINT", None)  # the Space's default: the embedded model, in-process
    process = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py")], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url, process, log, 120)
    yield url
    process.terminate()
    process.wait(timeout=20)


def test_space_front_matter_matches_the_pinned_gradio():
    import gradio

    front = yaml.safe_load((SPACE / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert front["sdk_version"] == gradio.__version__
    assert f"gradio=={front['sdk_version']}" in (SPACE / "requirements.txt").read_text()
    assert {"title", "emoji", "license", "short_description"} <= set(front)


def test_named_api_runs_stage1_merge_and_export(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    plot, counts, pairs = client.predict(
        "Example data (42 hand-written Alpaca rows)", None, "", 10, 0.8, 0.6, api_name="/stage1"
    )
    assert "40** valid" in counts and "1 empty instruction" in counts and "pairs" in counts
    assert len(pairs["data"]) >= 2 and len(plot["data"]) == 40 and plot["columns"][:3] == ["x", "y", "topic"]
    merges = client.predict(2, 0.75, 0.5, False, api_name="/merge")
    assert len(merges["data"]) == 2 and merges["headers"][4:7] == [
        "retention a: question / answer",
        "retention b: question / answer",
        "judge P(yes)",
    ]
    assert {row[0] for row in merges["data"]} <= {"accepted", "rejected", "failed"}
    # The sliders decide the merges shown again from their stored scores: the same merges, new decisions.
    strict = client.predict(1.0, 1.0, api_name="/regate")
    lenient = client.predict(0.3, 0.0, api_name="/regate")
    scored = [i for i, row in enumerate(merges["data"]) if row[0] != "failed"]
    assert [strict["data"][i][9] for i in scored] == [lenient["data"][i][9] for i in scored]
    assert all(strict["data"][i][0] == "rejected" for i in scored)
    assert all(lenient["data"][i][0] == "accepted" for i in scored), [lenient["data"][i][10] for i in scored]
    archive, card = client.predict(api_name="/export")
    assert Path(archive).suffix == ".zip" and Path(archive).stat().st_size > 0
    assert "## Provenance columns" in card and "| final rows |" in card


def test_errors_are_shown_not_stack_traces(space_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(space_url, verbose=False)
    with pytest.raises(AppError, match="Upload a JSON"):
        client.predict("Upload a file", None, "", 10, 0.8, 0.6, api_name="/stage1")
    with pytest.raises(AppError, match="Run stage 1 first"):
        client.predict(2, 0.75, 0.5, False, api_name="/merge")


@pytest.mark.browser
def test_clicking_through_stage1_in_headless_chromium(space_url, artifacts):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(space_url)
        page.click("#run-stage1")
        page.wait_for_selector("#counts:has-text('pairs at')", timeout=120_000)
        # The example data pairs the two Lisbon itineraries; gradio's virtualised table reports rows as hidden.
        page.wait_for_selector("#pairs-table:has-text('Lisbon')", timeout=30_000)
        page.wait_for_selector("#topic-map canvas, #topic-map svg", timeout=30_000)
        table_text = page.locator("#pairs-table").inner_text()
        counts_text = page.locator("#counts").inner_text()
        points = page.locator("#topic-map canvas, #topic-map svg").count()
        page.screenshot(path=str(artifacts / "space-stage1.png"), full_page=True)
        browser.close()
    assert "Lisbon" in table_text and "photosynthesis" in table_text
    assert "9 pairs" in counts_text and points >= 1
