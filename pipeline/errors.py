"""User-facing errors. Each carries the exit code the CLI maps it to.

Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 environment error,
4 internal error (a bug: the trace is printed), 130 interrupted, 141 the reader of stdout went
away (a pipe into ``head``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, after the stage cleaned up
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a tool killed by it


class PipelineError(Exception):
    """Base of every error meant for the user: one clear line, no traceback."""

    exit_code = EXIT_USAGE


class InputError(PipelineError):
    """A value the user gave is wrong: name it, the allowed set and the fix."""

    exit_code = EXIT_USAGE


class CheckFailed(PipelineError):
    """A parity or integrity check failed."""

    exit_code = EXIT_CHECK_FAILED


class EnvironmentUnavailable(PipelineError):
    """Something requested is not available here: a provider, a GPU, weights."""

    exit_code = EXIT_ENVIRONMENT
