"""The one exception type for user errors: the CLI prints it as a single line, no traceback."""


class TumorsegError(Exception):
    """A problem with the user's input (a file, folder, option); the message names it."""
