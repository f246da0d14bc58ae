"""Jinja prompt templates from ``prompts/`` (or a user's file), rendered in jinja2's sandbox."""

from __future__ import annotations

import hashlib
import sys
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mergeit_hf.errors import TemplateError
from mergeit_hf.resources import resource_dir


def _environment() -> ImmutableSandboxedEnvironment:
    # keep_trailing_newline: a template's bytes are the prompt's bytes (Deita's ends in "Quality: ").
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def resolve_template_path(name_or_path: str | Path, folder: str = "prompts") -> Path:
    """A bare name is looked up in the packaged folder; anything else is a path to the user's file."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate.resolve()
    packaged = resource_dir(folder) / str(name_or_path)
    if packaged.is_file():
        return packaged
    available = sorted(p.name for p in resource_dir(folder).glob("*.jinja"))
    raise TemplateError(f"template {str(name_or_path)!r} not found: not a file, nor one of {available}")


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template: its name, source and sha256 (recorded in every merged row's provenance)."""

    path: Path
    source: str = field(repr=False)

    @classmethod
    def load(cls, name_or_path: str | Path, folder: str = "prompts") -> PromptTemplate:
        path = resolve_template_path(name_or_path, folder)
        template = cls(path, path.read_text(encoding="utf-8"))
        _ = template.compiled  # syntax errors surface at load time, naming file and line
        return template

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @cached_property
    def variables(self) -> frozenset[str]:
        """The names the template reads from its context."""
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(self.source)))

    @cached_property
    def compiled(self) -> jinja2.Template:
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{self.path}, line {exc.lineno}: {exc.message}") from exc

    def render(self, **variables: Any) -> str:
        try:
            return self.compiled.render(**variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{self.path}, line {self._failing_line()}: {exc}") from exc

    def _failing_line(self) -> int | str:
        # jinja2 rewrites tracebacks so template frames carry the template's own line numbers.
        frames = traceback.extract_tb(sys.exc_info()[2])
        template_frames = [f for f in frames if f.filename in {"<template>", str(self.path)}]
        return template_frames[-1].lineno if template_frames else "?"
