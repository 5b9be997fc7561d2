"""The tool's errors. Each says in one line what is wrong and what to do; every front end turns them
into that line and a non-zero exit (cli.run_cli) or a 4xx answer (web_app)."""


class UsageError(ValueError):
    """Arguments that cannot work together; the message says what to change."""


class ImageError(ValueError):
    """An image or mask cannot be used; the message names the file and the reason."""


class ModelError(RuntimeError):
    """A backbone cannot be found, built or opened; the message says why."""


class FeatureFileError(ValueError):
    """A feature file cannot be used; the message says why."""


class MethodError(ValueError):
    """A method cannot work with this backbone; the message says why."""


class OutboxError(ValueError):
    """An outbox file cannot be used (not ours, damaged, in use); the message says why. Never deleted."""


TOOL_ERRORS = (UsageError, ImageError, ModelError, FeatureFileError, MethodError, OutboxError)
