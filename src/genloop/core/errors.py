"""User-facing errors: each message says what is wrong, where, and what to do."""


class GenloopError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class ConfigError(GenloopError):
    """params.yaml or a --set override is invalid."""


class SourceError(GenloopError):
    """A collect source cannot be read."""


class ValidationFailed(GenloopError):
    """The data gate rejected the dataset; training must not start."""


class StageInputMissing(GenloopError):
    """A stage's input (written by an earlier stage) is absent."""


class Unreachable(GenloopError):
    """A server or endpoint (S3, MLflow) did not answer; worth retrying later."""


class SourceUnreachable(SourceError, Unreachable):
    """An S3 source did not answer or refused the request."""


class SinkError(GenloopError):
    """An S3 sink (generate.sink, optimize.sink) cannot be written."""


class SinkUnreachable(SinkError, Unreachable):
    """An S3 sink did not answer (connection failure, 5xx, throttling); worth retrying."""


class RemoteError(GenloopError):
    """The DVC remote cannot be pushed to or pulled from."""


class RemoteUnreachable(RemoteError, Unreachable):
    """The DVC remote did not answer (connection failure, 5xx, throttling); worth retrying."""
