"""The one exception type for user errors: the CLI prints it as a single line, no traceback."""

_WORKER_PREFIX = "Caught TumorsegError"  # how torch's DataLoader re-raises a worker's exception
_ORIGINAL = "\ntumorseg.errors.TumorsegError: "  # the traceback's last line


class TumorsegError(Exception):
    """A problem with the user's input (a file, folder, option); the message names it.

    Raised in a DataLoader worker (a damaged prepared array), torch re-raises it in the main
    process with the worker's traceback as its message; the line the worker raised is kept.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(_WORKER_PREFIX) and _ORIGINAL in args[0]:
            args = (args[0].rsplit(_ORIGINAL, 1)[1].strip(),)
        super().__init__(*args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`scancel`, `docker stop`, `timeout`, torchrun stopping its workers), raised where the
    command is so that it cleans up as after Ctrl-C: temporaries removed, locks released, and
    training's line naming the epoch to resume from."""
