"""The one exception type whose message is shown to the user as it is, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix: the message names the file or setting and what to do."""
