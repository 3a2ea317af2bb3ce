"""The one error wrapper of every console script: :func:`run_cli`.

A mistake the user can fix is one line on stderr, ``<prog>: error: <what is wrong>``, and exit status 2; a failure
of the system rather than of the input (an address already taken, a worker that died) is one line and status 1;
Ctrl-C is status 130. Any other exception is a bug and keeps its traceback. Imports neither torch nor grpc, so the
light console scripts (moe-partition, moe-export) stay light.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["USAGE_ERRORS", "exit_now", "run_cli"]

#: what a console script reports as the user's mistake unless it says otherwise: bad values and files (the
#: project's error classes, CheckpointError, TopologyError, ConfigError, ... are ValueErrors), missing keys
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def _text(e: BaseException, one_line: bool) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
    return " ".join(text.split()) if one_line else text


def run_cli(prog: str, body: Callable[[], int | None], *,
            errors: tuple[type[BaseException], ...] = USAGE_ERRORS,
            failures: tuple[type[BaseException], ...] = (),
            interrupted: Callable[[], str] | None = None, one_line: bool = False) -> int:
    """Run ``body`` (its return value is the exit status; None is 0) with ``prog``'s error reporting: ``errors``
    exit 2, ``failures`` exit 1, each as one line (``one_line`` also folds a message's line breaks); Ctrl-C prints
    ``<prog>: interrupted`` plus what ``interrupted()`` adds (e.g. how to resume) and exits 130. Logging goes to
    stderr prefixed with ``prog`` unless the script configured it already."""
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(levelname)s: %(message)s")
    try:
        return int(body() or 0)
    except errors as e:
        print(f"{prog}: error: {_text(e, one_line)}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"{prog}: error: {_text(e, one_line)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted() if interrupted is not None else ''}", file=sys.stderr)
        return 130


def exit_now(code: int) -> NoReturn:
    """End this process with status ``code`` once logging, stdout and stderr are flushed, skipping the interpreter's
    teardown: for a process whose work is done and whose files are closed (``python -m moevit.worker.cli`` once it
    has stopped serving, ``python -m moevit.coordinator.cli`` once its run has closed and stopped what it opened).
    Tearing down torch's modules takes 0.5 s of CPU (``python -c "import torch"``: 2.1 s user, 1.6 s with
    ``os._exit``; a worker started, stopped with SIGTERM: 3.1 s of CPU in all, 2.5 s with this), which every stop of
    such a process waited for. Never call it in a process that runs anything else (a test calling ``main``): atexit
    handlers do not run."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader went away: nothing more to say to it
            pass
    os._exit(code)
