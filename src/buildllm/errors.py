"""The one exception type for mistakes in what a user gave us."""


class UserError(ValueError):
    """Bad input from the user: a missing file, an invalid option, a corpus too small.

    The CLI prints its message as a single line (``error: ...``) and exits with status 2, so the
    message must name the problem and say what to do about it. It is a ``ValueError``, so code
    that already catches bad values (``except ValueError``) catches it too.
    """
