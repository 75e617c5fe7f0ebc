"""User-facing errors: the CLI prints these as one line, without a traceback."""


class StepscopeError(Exception):
    """A mistake in the user's input or environment, with a message that says what to do."""


class ModelNotFoundError(StepscopeError):
    pass


class TraceError(StepscopeError):
    pass


class UnsupportedModelError(StepscopeError):
    pass
