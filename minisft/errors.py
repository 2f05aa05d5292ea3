"""The one exception type users see: the CLI prints its message (no traceback) and exits 2."""


class MinisftError(ValueError):
    """A problem with the user's input (a file, a record, a setting) described in plain words."""
