"""The one exception type that means "the user asked for something we cannot do"."""


class NumpruneError(Exception):
    """A user-facing error: the command line prints its message on one line and exits with status 2."""
