"""One exception type for bad user input, so the CLI can print one clear line and exit non-zero."""


class UserError(ValueError):
    """A problem the user can fix: a missing file, an empty corpus, a bad config value.

    The message names the thing and says what to do; the CLI prints it as one line
    (``error: <message>``) and exits with status 2 instead of a traceback.
    """


class IncompatiblePair(UserError):
    """A model family and an objective that cannot train together; in a grid sweep the job is skipped."""
