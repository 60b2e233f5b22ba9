"""The one exception type whose message is shown to the user as it is, without a traceback."""

# How PyTorch's DataLoader re-raises an error from a loader worker: the type is kept, the
# message becomes "Caught UserError in DataLoader worker process 0.\nOriginal Traceback ..."
# ending with "reidkit.run.errors.UserError: <our message>".
_WORKER_TRACEBACK = 'Original Traceback (most recent call last):'


class UserError(Exception):
    """A mistake the user can fix: the message names the file or setting and what to do.

    Raised in a data-loader worker, it comes back wrapped in the worker's traceback; the
    message is unwrapped again here, so the user sees the paragraph, not 15 lines of stack."""

    def __init__(self, message: str = '', *args):
        if isinstance(message, str) and _WORKER_TRACEBACK in message:
            marker = f'{type(self).__name__}: '
            message = message.rsplit(marker, 1)[-1].strip() if marker in message else message
        super().__init__(message, *args)
