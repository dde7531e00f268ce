"""The one exception type for bad user input.

Anything the user can fix (a path, a config key, a value) raises `UserError` with a message that
names the culprit and says what was expected. The CLI prints it as a single line and exits non-zero;
`--debug` shows the traceback instead.
"""


class UserError(Exception):
    """Bad input from the user: a file, key or value, and what was expected instead."""
