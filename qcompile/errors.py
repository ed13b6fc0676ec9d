"""The one exception type that means "the user gave us something wrong"."""


class QCompileError(Exception):
    """Bad input: the CLI prints it as one line and exits with code 2, never a traceback."""
