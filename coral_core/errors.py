"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input, stated as one sentence: which file, what is wrong,
    what to do. The CLI prints it as ``error: <sentence>`` and exits with status 2; the
    plugin shows it as a notification."""
