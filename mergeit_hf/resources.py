"""Find the packaged ``prompts/`` and ``cards/`` folders, in a wheel or in a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_dir(name: str) -> Path:
    """Folder ``name`` ("prompts" or "cards").

    A built wheel carries it inside the package (see pyproject's force-include); an editable install
    or a bare checkout keeps it at the top of the repository, beside the package.
    """
    inside_package = Path(str(resources.files("mergeit_hf"))) / name
    if inside_package.is_dir():
        return inside_package
    beside_package = Path(__file__).resolve().parent.parent / name
    if beside_package.is_dir():
        return beside_package
    raise FileNotFoundError(f"mergeit-hf resource folder {name!r} is missing from the installation")
