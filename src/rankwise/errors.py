"""Error types raised on bad user input.

Every user-facing error is a :class:`RankwiseError` (a ``ValueError``) whose message says
what was wrong and what to do. Raising one must leave the model, files and optimizer state
as they were: validate first, mutate last.
"""


class RankwiseError(ValueError):
    """Bad input to a rankwise API or command; the message says how to fix it."""


class LossDiverged(RankwiseError):
    """The training loss became non-finite at ``step`` (a learning rate too high for the set-up,
    typically); a sweep records it as a diverged run instead of stopping."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
