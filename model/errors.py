"""The one exception a user can cause and fix. The command lines print its message as one
line (`error: ...`, exit code 2); anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A mistake the user can fix: a bad flag, file, device or checkpoint."""
