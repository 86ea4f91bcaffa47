"""One exception type for user mistakes: the CLI prints its message, never a traceback."""


class UserError(Exception):
    """Bad input from the user (file, record, flag). The message says what is wrong and what to do."""
