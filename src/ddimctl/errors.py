"""The one exception type the CLI shows as a one-line message instead of a traceback."""


class DdimctlError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""
