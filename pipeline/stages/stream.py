"""The streaming engine: files in, predictions out, decode and inference overlapped.

One engine serves ``predict FOLDER``, ``bench --scenario offline`` and ``pipeline.predict``:

- **decode** runs in worker processes (``pipeline.stages.decoders``: PIL only, HWC uint8
  crops), fed from a lazy walk of the inputs that cannot loop or raise, and bounded to
  ``window`` files in flight, so memory does not grow with the folder. The workers start
  from any caller (no ``__main__`` guard needed), and a worker that dies costs its one file;
- **batches** form in input order as decoded images arrive, up to ``batch`` images, or fewer
  when the next file has kept a started batch waiting ``max_wait_s``;
- **inference** runs in this process on the chosen runner (ONNX Runtime and OpenVINO release
  the GIL, so workers keep decoding meanwhile);
- **results** stream out in input order, one batch at a time; a bad file is an error item in
  its place.

The cores are split deliberately (``plan_split``): decode workers and runtime threads share
the machine's N cores, chosen from a short measurement of both costs on one core.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.images import IMAGE_SUFFIXES, is_image_name, normalise
from pipeline.models.archs import Preprocessing
from pipeline.runtimes.base import Runner
from pipeline.stages.decoders import DecodePool, Ticket, decode_file

DEFAULT_MAX_WAIT_S = 0.05
CALIBRATION_FILES = 8


@dataclass
class Item:
    """One input file's outcome, in input order: logits, or an error."""

    file: str
    logits: np.ndarray | None = None
    error: str | None = None


@dataclass(frozen=True)
class Split:
    """How N cores are shared: decode worker processes and runtime threads."""

    cores: int
    workers: int
    threads: int
    decode_ms: float | None = None  # per image on one core, measured
    infer_ms: float | None = None  # per image on one core at the chosen batch, measured
    how: str = "given"

    def describe(self) -> str:
        measured = (f" (decode {self.decode_ms:.1f} ms/img, inference {self.infer_ms:.1f} ms/img, "
                    f"each on one core)" if self.decode_ms is not None and self.infer_ms is not None
                    else "")
        return (f"{self.cores} cores: {self.workers} decode worker(s), {self.threads} inference "
                f"thread(s), {self.how}{measured}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_rule(cores: int, decode_s: float, infer_s: float, *, device: str = "cpu") -> tuple[int, int]:
    """The documented rule: each side gets the cores its one-core cost per image asks for,
    rounded up, so that both run at about the same images/s: ``workers = ceil(N x d/(d+i))``,
    ``threads = ceil(N x i/(d+i))``. When the shares do not divide the cores evenly one core
    is shared (the OS interleaves a decode worker with the runtime thread), which measured
    better than leaving part of a core idle (2 cores, decode 70% of the cost: 2 workers and 1
    thread gave 95 img/s, 1 and 1 gave 88). On a GPU the runtime needs one thread to feed it
    and every core decodes."""
    if device != "cpu":
        return cores, 1
    share = decode_s / max(decode_s + infer_s, 1e-12)
    workers = min(cores, max(1, math.ceil(cores * share - 1e-9)))
    threads = min(cores, max(1, math.ceil(cores * (1.0 - share) - 1e-9)))
    return workers, threads


def walk(inputs: Iterable[Path]) -> Iterator[tuple[Path, str | None]]:
    """Image files named directly, and image files under folders in sorted order, walked
    lazily (one directory listing in memory at a time); (path, error) for what cannot be used.

    Nothing here raises: an entry that cannot be ``stat``-ed (a link loop, a dangling link, no
    permission, a name the file system rejects) and a folder that cannot be listed are error
    lines for their paths, and the walk goes on. Each real folder is entered once per input
    (by device and inode), so a link back to a folder already walked, an ancestor included,
    is an error line rather than an endless walk."""
    for item in inputs:
        item = Path(item)
        info, problem = _stat(item)
        if info is None:
            yield item, problem
        elif stat.S_ISDIR(info.st_mode):
            found = False
            for path, problem in _walk_dir(item, info):
                found = True
                yield path, problem
            if not found:
                yield item, f"{item}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        elif stat.S_ISREG(info.st_mode):
            yield item, None
        else:
            yield item, f"{item}: not a regular file or a folder"


def _stat(path: Path) -> tuple[os.stat_result | None, str | None]:
    """The entry's stat, following links, or why it cannot be had."""
    try:
        return os.stat(path), None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, f"{path}: symbolic link loop ({exc.strerror}); skipped"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return None, f"{path}: dangling symbolic link to {os.readlink(path)!r}; skipped"
        if exc.errno == errno.ENOENT:
            return None, f"{path}: no such file or folder"
        return None, f"{path}: cannot read ({exc.strerror}); skipped"
    except ValueError as exc:  # a name the OS cannot take (an embedded NUL)
        return None, f"{path!s}: unusable file name ({exc}); skipped"


def _walk_dir(root: Path, info: os.stat_result) -> Iterator[tuple[Path, str | None]]:
    """Depth first, entries sorted by name; a stack of listings rather than recursion, so
    the depth is bounded by the file system's path length, not Python's recursion limit."""
    entered = {(info.st_dev, info.st_ino)}
    listing, problem = _list(root)
    if problem:
        yield root, problem
        return
    stack = [listing]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        path = Path(entry.path)
        target, problem = _stat(path)
        if target is None:
            if os.path.lexists(path):  # a loop, a dangling link, no permission
                yield path, problem
            continue  # removed while we walked: gone, as if never listed
        if stat.S_ISREG(target.st_mode):
            if is_image_name(path):
                yield path, None
            continue
        if not stat.S_ISDIR(target.st_mode):
            continue  # a socket, fifo or device: not an image file
        if entry.is_symlink() and _is_ancestor(os.path.realpath(path), os.path.realpath(root)):
            yield path, (f"{path}: link to an ancestor folder ({os.path.realpath(path)}), "
                         f"which would walk forever; skipped")
            continue
        if (target.st_dev, target.st_ino) in entered:
            yield path, (f"{path}: link to a folder already walked "
                         f"({os.path.realpath(path)}); skipped")
            continue
        entered.add((target.st_dev, target.st_ino))
        listing, problem = _list(path)
        if problem:
            yield path, problem
        else:
            stack.append(listing)


def _is_ancestor(folder: str, of: str) -> bool:
    """``folder`` is ``of`` or a folder above it (both real paths)."""
    return of == folder or of.startswith(folder.rstrip(os.sep) + os.sep)


def _list(folder: Path) -> tuple[Iterator[os.DirEntry], str | None]:
    try:
        with os.scandir(folder) as scan:
            return iter(sorted(scan, key=lambda e: e.name)), None
    except OSError as exc:
        return iter(()), f"{folder}: cannot list folder ({exc.strerror}); skipped"


class Engine:
    """Decode workers, a bounded in-order window, dynamic batches, one runner."""

    def __init__(self, runner: Runner, prep: Preprocessing, *, batch: int, workers: int,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, fast_decode: bool = False,
                 window: int | None = None) -> None:
        self.runner, self.prep = runner, prep
        self.batch, self.workers, self.max_wait_s = batch, workers, max_wait_s
        self.fast_decode = fast_decode
        self.window = window or max(2 * batch, 4 * max(workers, 1))
        self.batches = 0
        self.images = 0

    def run(self, files: Iterable[tuple[Path, str | None]]) -> Iterator[Item]:
        """Items in input order, a batch at a time. Closing the generator (or Ctrl-C) stops
        the workers and drops what is in flight."""
        if self.workers == 0:
            yield from self._run_inline(files)
            return
        pool = DecodePool(self.workers, self.prep, self.fast_decode)
        try:
            yield from self._run_pool(pool, iter(files))
        finally:
            pool.close()

    def _run_pool(self, pool: DecodePool, files: Iterator[tuple[Path, str | None]]) -> Iterator[Item]:
        pending: deque[tuple[Path, Ticket | str]] = deque()
        ready: list[tuple[Path, np.ndarray | None, str | None]] = []
        started = 0.0
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.window:
                try:
                    path, problem = next(files)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((path, problem if problem else pool.submit(str(path))))
            if not pending:
                break
            path, job = pending[0]
            if isinstance(job, str):
                pending.popleft()
                ready.append((path, None, job))
                continue
            good = sum(1 for _, pixels, _ in ready if pixels is not None)
            timeout = None if not good else max(0.0, started + self.max_wait_s - time.perf_counter())
            try:
                pixels, problem = pool.result(job, timeout)
            except TimeoutError:
                yield from self._flush(ready)  # a started batch waited long enough
                ready = []
                continue
            pending.popleft()
            if pixels is not None and not good:
                started = time.perf_counter()
            ready.append((path, pixels, problem))
            if pixels is not None and good + 1 >= self.batch:
                yield from self._flush(ready)
                ready = []
        yield from self._flush(ready)

    def _run_inline(self, files: Iterable[tuple[Path, str | None]]) -> Iterator[Item]:
        ready: list[tuple[Path, np.ndarray | None, str | None]] = []
        for path, problem in files:
            pixels = None
            if problem is None:
                pixels, problem = decode_file(str(path), self.prep, self.fast_decode)
            ready.append((path, pixels, problem))
            if sum(1 for _, p, _ in ready if p is not None) >= self.batch:
                yield from self._flush(ready)
                ready = []
        yield from self._flush(ready)

    def _flush(self, ready: list[tuple[Path, np.ndarray | None, str | None]]) -> Iterator[Item]:
        crops = [pixels for _, pixels, _ in ready if pixels is not None]
        logits = iter(self.runner.infer(normalise(np.stack(crops), self.prep)) if crops else [])
        if crops:
            self.batches += 1
            self.images += len(crops)
        for path, pixels, problem in ready:
            yield Item(str(path), next(logits) if pixels is not None else None, problem)


# ----------------------------------------------------------------------------- the core split
def measure_decode(paths: list[Path], prep: Preprocessing, fast: bool) -> tuple[float, list[np.ndarray]]:
    """Seconds per image decoding ``paths`` here (one core); the crops that decoded."""
    crops, start = [], time.perf_counter()
    for path in paths:
        pixels, _ = decode_file(str(path), prep, fast)
        if pixels is not None:
            crops.append(pixels)
    return (time.perf_counter() - start) / max(len(paths), 1), crops


def measure_infer(runner: Runner, crops: list[np.ndarray], prep: Preprocessing, batch: int,
                  repeats: int = 3) -> float:
    """Seconds per image at ``batch`` (best of ``repeats`` after one warm-up call)."""
    tiled = [crops[i % len(crops)] for i in range(batch)]
    inputs = normalise(np.stack(tiled), prep)
    runner.infer(inputs)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        runner.infer(inputs)
        runner.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / batch


def plan_split(sample: list[Path], prep: Preprocessing, probe: Runner, *, batch: int,
               cores: int | None = None, fast: bool = False, device: str = "cpu") -> Split:
    """Measure decode and inference on one core each, on the first files (``probe`` is a
    one-thread runner of the chosen model), and split the cores by ``split_rule``."""
    cores = cores or available_cores()
    decode_s, crops = measure_decode(sample, prep, fast)
    if not crops:
        workers, threads = split_rule(cores, 1.0, 1.0, device=device)
        return Split(cores, workers, threads, how="no decodable file to measure: even split")
    infer_s = measure_infer(probe, crops, prep, batch)
    workers, threads = split_rule(cores, decode_s, infer_s, device=device)
    return Split(cores, workers, threads, 1e3 * decode_s, 1e3 * infer_s,
                 how=f"measured on {len(sample)} file(s)")
