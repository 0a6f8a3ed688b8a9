"""Decode worker processes that survive what a plain loop survives.

Why not ``multiprocessing``'s pools: a spawned or forkserver child re-imports the caller's
``__main__`` (to unpickle what it might define), so a script without an
``if __name__ == "__main__"`` guard, or code read from standard input, runs again inside
every worker and the pool breaks; and one worker that dies (a decoder's segfault, the kernel's
OOM killer) breaks the whole pool, failing every file in flight. Here:

- each worker is ``python -m pipeline.stages.decoders``, a fresh interpreter that imports
  only this package, whoever the caller is: a script, ``python -c``, standard input, a
  notebook, or a thread of a web server;
- each worker has its own pair of pipes and decodes its files in the order sent, so the
  parent always knows which file a worker held when it died. That file is retried once on a
  fresh worker; if it kills that one too it becomes an error naming the cause ("decoder
  crashed: signal 9 (SIGKILL)") and the run goes on. Every other file the dead worker held is
  sent again;
- a reader thread drains results while the caller's thread runs inference, so workers never
  wait on a full pipe.

Workers start in their own session, so Ctrl-C at a terminal reaches only the caller, which
stops them. A worker whose parent is gone sees its pipe close and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.images import BadImage, decode_crop
from pipeline.errors import EnvironmentUnavailable
from pipeline.models.archs import Preprocessing

PER_WORKER = 2  # files sent ahead to each worker, so it never waits for the next one
STOP_GRACE_S = 2.0
# Test hook: a worker kills itself with SIGKILL on the file of this name (every time; or once,
# if KILL_ONCE_HOOK names a marker file, which the first kill creates). Honoured only under
# pytest (PYTEST_CURRENT_TEST is set), so that a test can kill a real worker.
KILL_HOOK = "PIPELINE_TEST_DECODER_KILL_ON"
KILL_ONCE_HOOK = "PIPELINE_TEST_DECODER_KILL_ONCE_MARKER"


def decode_file(path: str, prep: Preprocessing, fast: bool) -> tuple[np.ndarray | None, str | None]:
    """The crop, or why the file is not usable. Nothing a file can do raises from here."""
    try:
        return decode_crop(path, prep, fast=fast), None
    except BadImage as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure on one file is that file's error
        return None, f"{path}: cannot decode ({type(exc).__name__}: {exc})"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "its pipe closed"
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(eq=False)
class Ticket:
    """One file's place in the pool: set once, when its worker answers or it is given up."""

    path: str
    crashes: list[str] = field(default_factory=list)
    done: bool = False
    pixels: np.ndarray | None = None
    problem: str | None = None


class _Worker:
    def __init__(self, prep: Preprocessing, fast: bool) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # The worker imports this package from where the caller imported it.
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.stages.decoders", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.inbox = Connection(to_child_w, readable=False)
        self.outbox = Connection(from_child_r, writable=False)
        self.held: deque[Ticket] = deque()
        self.ready = False
        self.inbox.send((prep, fast))

    def send(self, ticket: Ticket) -> None:
        self.held.append(ticket)
        try:
            self.inbox.send(ticket.path)
        except OSError:
            pass  # it died; the reader sees its pipe close and re-sends what it held

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass  # already gone

    def reap(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def close_pipes(self) -> None:
        for conn in (self.inbox, self.outbox):
            try:
                conn.close()
            except OSError:
                pass


class DecodePool:
    """``workers`` decode processes. ``submit(path)`` returns a Ticket at once; ``result``
    waits for it. Files are decoded concurrently and may finish in any order."""

    def __init__(self, workers: int, prep: Preprocessing, fast: bool = False) -> None:
        self.prep, self.fast = prep, fast
        self.backlog: deque[Ticket] = deque()
        self.changed = threading.Condition()
        self.failed_starts = 0
        self.fatal: str | None = None
        self.closing = False
        self.workers = [_Worker(prep, fast) for _ in range(max(1, workers))]
        self._wake_r, self._wake_w = os.pipe()
        self.reader = threading.Thread(target=self._read, name="decode-pool-reader", daemon=True)
        self.reader.start()

    # -- the caller's side
    def submit(self, path: str) -> Ticket:
        ticket = Ticket(path)
        with self.changed:
            self.backlog.append(ticket)
            self._dispatch()
        return ticket

    def result(self, ticket: Ticket, timeout: float | None = None) -> tuple[np.ndarray | None, str | None]:
        """The ticket's (pixels, problem); raises TimeoutError if not ready within ``timeout``."""
        with self.changed:
            if not self.changed.wait_for(lambda: ticket.done or self.fatal is not None, timeout):
                raise TimeoutError
            if not ticket.done:
                raise EnvironmentUnavailable(self.fatal or "decode workers stopped")
        return ticket.pixels, ticket.problem

    def imap(self, paths: Iterable[str], window: int) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """(path, pixels, problem) in the order given, at most ``window`` files in flight."""
        pending: deque[Ticket] = deque()
        for path in paths:
            pending.append(self.submit(path))
            while len(pending) >= window:
                ticket = pending.popleft()
                yield (ticket.path, *self.result(ticket))
        while pending:
            ticket = pending.popleft()
            yield (ticket.path, *self.result(ticket))

    def close(self) -> None:
        """Stop the workers at once (they hold nothing but what is in flight, which is
        dropped: a Ctrl-C does not wait for a large image to finish) and the reader."""
        with self.changed:
            self.closing = True
            workers = list(self.workers)
        for worker in workers:
            worker.kill()
        os.write(self._wake_w, b"x")
        self.reader.join(STOP_GRACE_S)
        for worker in workers:
            worker.reap(STOP_GRACE_S)
            worker.close_pipes()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- under self.changed
    def _dispatch(self) -> None:
        for worker in self.workers:
            while self.backlog and len(worker.held) < PER_WORKER:
                worker.send(self.backlog.popleft())

    def _answer(self, ticket: Ticket, pixels: np.ndarray | None, problem: str | None) -> None:
        ticket.pixels, ticket.problem, ticket.done = pixels, problem, True
        self.changed.notify_all()

    # -- the reader thread
    def _read(self) -> None:
        wake = self._wake_r
        try:
            while True:
                with self.changed:
                    if self.closing:
                        return
                    by_pipe = {worker.outbox: worker for worker in self.workers}
                for pipe in wait([*by_pipe, wake]):
                    if pipe is wake:
                        continue
                    worker = by_pipe[pipe]
                    try:
                        message = pipe.recv()
                    except (EOFError, OSError):
                        self._died(worker)
                        continue
                    with self.changed:
                        if message == "ready":
                            worker.ready, self.failed_starts = True, 0
                        elif worker.held:
                            pixels, problem = message
                            self._answer(worker.held.popleft(), pixels, problem)
                        self._dispatch()
        except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting forever
            with self.changed:
                self.fatal = f"decode pool stopped: {type(exc).__name__}: {exc}"
                self.changed.notify_all()

    def _died(self, worker: _Worker) -> None:
        """A worker's pipe closed: the file it was decoding is retried once on a fresh worker,
        then given up with the cause; the files queued behind it are sent again."""
        code = worker.reap(STOP_GRACE_S)
        worker.close_pipes()
        with self.changed:
            if self.closing:
                return
            cause = describe_exit(code)
            self.workers.remove(worker)
            if not worker.ready:
                self.failed_starts += 1
                if self.failed_starts >= 2:
                    self.fatal = (f"decode workers cannot start ({cause}; the worker's message is "
                                  f"above): check that {sys.executable} -m pipeline.stages.decoders "
                                  f"can import this package")
                    self.changed.notify_all()
                    return
            held = list(worker.held)
            fresh = _Worker(self.prep, self.fast)
            if held and worker.ready:  # it died on the first file it held
                culprit, held = held[0], held[1:]
                culprit.crashes.append(cause)
                if len(culprit.crashes) >= 2:
                    self._answer(culprit, None, f"{culprit.path}: decoder crashed: "
                                                f"{culprit.crashes[0]}, then {cause} on a fresh "
                                                f"worker; skipped")
                else:
                    fresh.send(culprit)  # alone on a fresh worker: a second death is its own
            self.backlog.extendleft(reversed(held))
            self.workers.append(fresh)
            self._dispatch()


# ----------------------------------------------------------------------------- the worker
def _serve(read_fd: int, write_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller stops us
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    kill_on = os.environ.get(KILL_HOOK) if os.environ.get("PYTEST_CURRENT_TEST") else None
    try:
        prep, fast = inbox.recv()
        outbox.send("ready")
        while True:
            path = inbox.recv()
            if path is None:
                return
            if kill_on and os.path.basename(path) == kill_on:
                _kill_self()
            outbox.send(decode_file(path, prep, fast))
    except (EOFError, BrokenPipeError):
        return  # the caller has gone


def _kill_self() -> None:
    marker = os.environ.get(KILL_ONCE_HOOK)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
