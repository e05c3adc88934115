"""The one exception type for mistakes a user can fix (bad paths, columns, options).

The CLI prints these as a single line and exits with code 2; everything else is a bug.
It subclasses ValueError so library callers can catch it the usual way.
"""


class TextclError(ValueError):
    """A problem with the user's input, worded as one line that names the fix."""
