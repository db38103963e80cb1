"""Errors a user can act on. The CLI prints them as one clear message, never a traceback."""

from __future__ import annotations


class PerpairError(Exception):
    """Base class for every error perpair reports to the user."""


class InputError(PerpairError):
    """Bad input that names where it is: file, row (1-based) and field."""

    def __init__(self, problem: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.problem = problem
        self.file = file
        self.row = row
        self.field = field
        where = ", ".join(p for p in (
            file and f"file {file}",
            row is not None and f"row {row}",
            field and f"field '{field}'",
        ) if p)
        super().__init__(f"{where}: {problem}" if where else problem)


class TooFewAnnotated(PerpairError):
    """A stage finished, but too few pairs got what the run needs (annotations): exit status 3, not 2, since
    nothing the user gave was malformed; what was done is kept (cached) for a re-run."""

    exit_code = 3


class ArtifactMismatch(PerpairError):
    """An artifact does not match the input it claims to be built from."""


class FailedOnMainProcess(PerpairError):
    """Raised on the other processes of a launch (torchrun, accelerate launch) when the main process refused work
    it does alone (preparing DATA, claiming OUT, writing a checkpoint): the main process prints the error, these
    exit with its status without a word, instead of each failing in its next collective with a traceback."""

    def __init__(self, exit_code: int):
        super().__init__("the main process of this launch failed (its error is above)")
        self.exit_code = exit_code


class StoppedBySignal(BaseException):
    """Work stopped on SIGTERM or SIGUSR1 (:mod:`perpair.signals`), where it was, as Ctrl-C stops it: a
    ``BaseException`` as ``KeyboardInterrupt`` is, so that no ``except Exception`` (or ``except PerpairError``) takes
    it for a failure of the work it stopped. Its message is the one line the command prints, its status ``128 + the
    signal's number``, as a shell reports a process that a signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def __reduce__(self):  # back from a worker process of perpair run (the default gives the class the message alone)
        return type(self), (self.args[0], self.exit_code - 128)


class TrainingStopped(StoppedBySignal):
    """A training stopped on SIGTERM or SIGUSR1 (:mod:`perpair.train.stopping`): after its step, with a checkpoint,
    or before training at once."""
