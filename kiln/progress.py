"""Progress inside the long steps (the CUDA build, AWQ's search, calibration, perplexity): a few lines on
the ``kiln.progress`` logger, which the CLI prints on stderr; a library caller sees them only if it
configures logging."""

from __future__ import annotations

import logging

log = logging.getLogger("kiln.progress")


def note(message: str) -> None:
    """One line: a phase of a long step begins."""
    log.info(message)


def count(what: str, done: int, total: int, lines: int = 10) -> None:
    """``what done/total`` for about ``lines`` evenly spaced values of ``done`` (1-based), the first and the
    last included: a long loop reports without flooding."""
    step = max(1, -(-total // lines))
    if done in (1, total) or done % step == 0:
        log.info("%s %d/%d", what, done, total)
