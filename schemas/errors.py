"""The one error type for mistakes a user can fix (bad file, bad config, unreachable endpoint).

The CLI prints such an error as one line naming the input and the fix, with no traceback;
every other exception is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Raised with a message that names the bad input and says how to fix it."""
