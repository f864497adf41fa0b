"""The one exception type for mistakes a user can fix (bad paths, flags, files)."""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback.

    Command-line entry points catch it, log its message and exit with status 2.
    The message names the file or flag at fault and what was expected.
    """
