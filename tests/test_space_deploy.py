"""Issue 26: the demo Space deploys as Spaces build it: published with a wheel of this package that its
requirements name, checked against a test double of ``HfApi``, then installed from those requirements into
a fresh venv (as a Space's build does) and started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client

from mergeit_hf.output.space import SPACE_EXTRAS, build_wheel, publish_space, stage_space
from mergeit_hf.run.cli import main
from tests.helpers.servers import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "spaces" / "mergeit-demo"


class SpaceApi:
    """A test double of ``HfApi`` for a Space: records the repo it makes and the one commit."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **options):
        self.repos.append({"repo_id": repo_id, **options})

    def create_commit(self, repo_id, repo_type, operations, commit_message):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": files, "message": commit_message})
        return f"https://huggingface.co/spaces/{repo_id}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("dist"))


def test_the_space_is_published_in_one_commit_with_the_wheel_its_requirements_name(wheel, monkeypatch):
    api = SpaceApi()
    monkeypatch.setattr("mergeit_hf.output.space.build_wheel", lambda project, out: wheel)
    publish_space("me/mergeit-demo", SPACE, ROOT, api=api)
    assert api.repos == [
        {"repo_id": "me/mergeit-demo", "repo_type": "space", "space_sdk": "gradio", "private": False, "exist_ok": True}
    ]
    (commit,) = api.commits
    files = commit["files"]
    assert commit["repo_type"] == "space" and set(files) == {"README.md", "app.py", "requirements.txt", wheel.name}
    requirements = files["requirements.txt"].decode().splitlines()
    assert requirements[0] == f"./{wheel.name}[{SPACE_EXTRAS}]"
    assert not any(line.startswith("mergeit-hf") for line in requirements)  # on no index a Space can reach
    assert files[wheel.name] == wheel.read_bytes() and files["app.py"] == (SPACE / "app.py").read_bytes()


def test_the_cli_refuses_a_folder_without_the_app(tmp_path, capsys):
    assert main(["publish-space", "me/x", "--space-dir", str(tmp_path)]) == 2
    assert "holds no app.py" in capsys.readouterr().err


@pytest.mark.slow
def test_the_published_requirements_install_into_a_fresh_venv_and_the_app_starts(wheel, tmp_path):
    staged = tmp_path / "space"
    stage_space(SPACE, wheel, staged)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # The CPU wheel of torch first, as these machines need (a Space's build takes PyPI's); then exactly
    # what the Space's build runs, from the Space's folder.
    subprocess.run([*pip, "torch==2.13.0"], check=True, capture_output=True)
    installed = subprocess.run([*pip, "-r", "requirements.txt"], cwd=staged, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    env |= {"GRADIO_ANALYTICS_ENABLED": "False", "MERGEIT_CACHE": str(tmp_path / "cache")}
    env.pop("MERGEIT_ENDPOINT", None)
    env.pop("PYTHONPATH", None)  # the venv's own mergeit_hf, from the wheel, not this checkout
    log = tmp_path / "app.log"
    app = subprocess.Popen(
        [str(venv / "bin" / "python"), "app.py"], cwd=staged, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, app, log, 180)
        client = Client(url, verbose=False)
        assert "/stage1" in str(client.view_api(return_format="dict"))
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import mergeit_hf; print(mergeit_hf.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert str(venv) in where  # the app ran on the installed wheel
    finally:
        app.terminate()
        app.wait(timeout=30)
