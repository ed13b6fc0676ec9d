"""Failures, told apart by exit code: the user's input (2), a bug of ours (3), an output below the
accuracy floor under --strict (4)."""


def first_line(error: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class QCompileError(Exception):
    """Bad input: the CLI prints it as one line and exits with code 2, never a traceback."""


class BelowFloorError(QCompileError):
    """--strict and the deployed output SQNR fell below the floor: exit code 4, nothing written."""


class InternalError(Exception):
    """A failure inside qcompile (a bug of ours), named by where it happened: the CLI prints one
    line and exits with code 3; `qcompile --debug` also prints the traceback of the cause."""

    def __init__(self, where: str, cause: BaseException):
        detail = first_line(cause) if str(cause).strip() else ""
        super().__init__(f"{where}: {type(cause).__name__}{': ' + detail if detail else ''}")
        self.where = where
