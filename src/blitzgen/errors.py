"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class BlitzgenError(Exception):
    """A mistake in what the user asked for (bad file, bad value); never a bug in blitzgen."""


class ModelLoadError(BlitzgenError):
    """The model source is missing, corrupt, or of an unsupported kind."""


class UnsupportedModelError(ModelLoadError):
    """The model is of an architecture or tensor type blitzgen does not run."""


class InvalidRequestError(BlitzgenError):
    """A prompt or sampling value is invalid (empty prompt, too long, negative temperature...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested tokens do not fit the model's context."""
