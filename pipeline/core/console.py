"""Terminal output: one line per stage on stderr, and capture of third-party chatter.

Exporters and onnxsim print progress, warnings and deprecation notices, some of it from C++
straight to file descriptors 1 and 2. ``captured()`` redirects both descriptors and Python's
warnings into a buffer, so stdout stays clean for ``--json`` and the text can be kept in the
bundle (``export.log``) instead of flooding the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator


def log(message: str) -> None:
    """A human-facing line; always stderr so stdout can carry JSON."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Captured:
    text: str = ""
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def captured(*, passthrough: bool = False) -> Iterator[Captured]:
    """Collect everything written to fds 1/2, Python warnings and log records."""
    result = Captured()
    if passthrough:
        yield result
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        root.addHandler(handler)
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            result.text = sink.read().decode("utf-8", errors="replace")
            result.warnings = _unique(f"{w.category.__name__}: {w.message}" for w in caught)


def _unique(items: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(items))


class StageTimer:
    """Times named stages, prints ``name  1.23s  detail`` per stage, keeps the durations."""

    def __init__(self, *, quiet: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.durations: dict[str, float] = {}
        self.quiet = quiet
        self.log = log or globals()["log"]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        detail: dict[str, str] = {}
        start = time.perf_counter()
        yield detail
        elapsed = time.perf_counter() - start
        self.durations[name] = round(elapsed, 3)
        if not self.quiet:
            self.log(f"  {name:<12} {elapsed:6.2f}s  {detail.get('text', '')}".rstrip())
