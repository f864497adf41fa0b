"""The exception for mistakes a user can fix (bad paths, flags, files), and the one for a stop
signal that ends a program at once."""

import signal


class UserError(Exception):
    """A problem with the user's input (naming the file or flag at fault and what was expected):
    entry points log its message as one line, without a traceback, and exit with status 2."""


class StopNow(KeyboardInterrupt):
    """A signal that ends the program at once (exit status 128 + ``signum``); a
    KeyboardInterrupt, so that every clean-up written for Ctrl-C runs for it too."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
