"""The one exception type the CLI turns into a one-line error message."""


class CnnpipeError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
