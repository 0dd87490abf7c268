"""The base class of satlib's expected failures: bad input, or a fault of the machine it runs on.

Each such error has a one-sentence message that says what went wrong and what to do about it; the
command line (``python -m satlib``) prints that sentence alone and exits with status 2, never with a
traceback. A failure of any other class is a bug of satlib and keeps its traceback.
"""


class SatlibError(Exception):
    """A failure the user can act on; its message is one sentence."""
