"""The one error type for mistakes a user can fix (bad file, bad config, unreachable endpoint).

The CLI prints such an error as one line naming the input and the fix, with no traceback;
every other exception is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Raised with a message that names the bad input and says how to fix it."""


ERROR_FILE_ENV = "LMLM_ERROR_FILE"  # set by the launcher of a step that runs in a process of its own


def report_to_launcher(message: str) -> None:
    """Hand a user error's one line to the process that launched this step (``flows.runners.run_module``),
    which raises it there as a UserInputError; a no-op when nothing launched us."""
    import json
    import os

    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"error": message}, f)
