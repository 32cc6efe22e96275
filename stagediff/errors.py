"""The one exception type users see: it names the bad input and the fix."""


class StagediffError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints the message (no traceback) and exits with status 2. Raise it
    with a sentence that names the input and says what to do, e.g.
    ``StagediffError("hook layer 40 is out of range for base_model (30 layers): use 0..29")``.
    """
