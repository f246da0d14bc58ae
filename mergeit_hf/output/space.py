"""The demo Space as Spaces build it: its folder, a wheel of this package, and a ``requirements.txt`` that
names the wheel (``mergeit-hf`` is on no package index a Space can reach), published in one commit.

``mergeit publish-space OWNER/NAME`` builds the wheel from the checkout, stages ``spaces/mergeit-demo`` with
it, and commits the lot to a Gradio Space; ``stage_space`` alone writes the folder a Space would get (what
the tests install into a fresh venv and start).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi

from mergeit_hf.endpoints.http.transport import redact
from mergeit_hf.errors import MergeItError

#: The extras the Space needs: the embedded model and Gradio.
SPACE_EXTRAS = "local,space"
_PACKAGE = "mergeit-hf"


def build_wheel(project: Path, out: Path) -> Path:
    """A wheel of the package in ``project`` (a checkout), built by pip into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(project)],
        capture_output=True,
        text=True,
    )
    wheels = sorted(out.glob("mergeit_hf-*.whl"))
    if built.returncode or not wheels:
        raise MergeItError(f"building the wheel of {project} failed: {built.stderr.strip()[-500:]}")
    return wheels[-1]


def stage_space(space: Path, wheel: Path, staging: Path) -> list[Path]:
    """The Space's files in ``staging``: the app and its card as they are, the wheel, and the requirements
    with the package line replaced by the wheel (its extras kept). Returns the paths written, relative."""
    staging.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(space.iterdir()):
        if path.is_file() and path.name != "requirements.txt":
            shutil.copy2(path, staging / path.name)
            written.append(Path(path.name))
    shutil.copy2(wheel, staging / wheel.name)
    written.append(Path(wheel.name))
    lines = (space / "requirements.txt").read_text().splitlines()
    others = [line for line in lines if line.strip() and not line.strip().startswith(_PACKAGE)]
    # A path relative to the Space's root, where Spaces run ``pip install -r requirements.txt``.
    (staging / "requirements.txt").write_text("\n".join([f"./{wheel.name}[{SPACE_EXTRAS}]", *others]) + "\n")
    written.append(Path("requirements.txt"))
    return written


def publish_space(
    repo_id: str,
    space: Path,
    project: Path,
    *,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
) -> Any:
    """Build the wheel, stage the Space and commit it to the Gradio Space ``repo_id`` in one commit."""
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        wheel = build_wheel(project, Path(folder) / "dist")
        staging = Path(folder) / "space"
        written = stage_space(space, wheel, staging)
        try:
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            operations = [
                CommitOperationAdd(path_in_repo=path.as_posix(), path_or_fileobj=str(staging / path))
                for path in written
            ]
            return api.create_commit(
                repo_id=repo_id,
                repo_type="space",
                operations=operations,
                commit_message=f"Deploy the MergeIT demo with {wheel.name}",
            )
        except Exception as exc:  # huggingface_hub's HTTP errors: name the Space, hide the token
            raise MergeItError(f"publishing the Space {repo_id!r} failed: {redact(str(exc), token)}") from None
