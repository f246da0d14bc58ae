"""Progress bars and library logs as a run shows them: one bar per stage of the run's own, the bars of
``datasets``' internal steps off inside them, and the user's settings restored after."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """No ``datasets`` progress bar inside the block (a filter, a parquet write, a map that takes a moment);
    whatever the caller had set is back after it."""
    from datasets.utils import logging as datasets_logging

    with _bars_off(datasets_logging):
        yield


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """No ``transformers`` bar (its "Loading weights" bar, printed inside the embedding stage's own)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # no transformers: nothing prints
        yield
        return
    with _bars_off(transformers_logging):
        yield


@contextmanager
def _bars_off(library_logging: Any) -> Iterator[None]:
    """A library's bars off (its ``logging`` module's own switches), the caller's setting restored."""
    shown = library_logging.is_progress_bar_enabled()
    library_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            library_logging.enable_progress_bar()


@contextmanager
def datasets_errors_expected() -> Iterator[None]:
    """``datasets`` logs below CRITICAL silenced for a step whose failure the caller handles and reports
    itself (its JSON builder logs ``ERROR ... Failed to load JSON`` before raising on a broken line)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
