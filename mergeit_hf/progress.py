"""Progress bars and library logs as a run shows them: one bar per stage of the run's own, the bars of
``datasets``' internal steps off inside them, and the user's settings restored after."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """No ``datasets`` progress bar inside the block (a filter, a parquet write, a map that takes a moment);
    whatever the caller had set is back after it."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """No ``transformers`` bar (its "Loading weights" bar, printed inside the embedding stage's own)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # no transformers: nothing prints
        yield
        return
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


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
