"""Entry-point plumbing shared by the command-line tools."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Sequence

from utils.base.errors import StopNow, UserError

log = logging.getLogger(__name__)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError becomes one ``error: ...`` line and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the one line a user sees
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C is SIGINT: 130; a StopNow carries the signal that ended the run.
        signum = err.signum if isinstance(err, StopNow) else signal.SIGINT
        name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(f"error: interrupted{name}", file=sys.stderr)  # noqa: T201
        return 128 + signum
