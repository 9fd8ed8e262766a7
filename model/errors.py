"""Errors Galen raises for bad input: each message says what is wrong and how to fix it.

They subclass ValueError/FileNotFoundError so callers that already catch those keep working,
and so the CLI and the HTTP layer can turn them into clean messages instead of stack traces.
"""


class GalenError(Exception):
    """Base class of every error Galen raises on purpose."""


class GalenConfigError(GalenError, ValueError):
    """A model config or size name that cannot be built."""


class GalenInputError(GalenError, ValueError):
    """Model inputs (images, prompts, ids) that the model cannot take."""


class GalenCheckpointError(GalenError, ValueError):
    """A checkpoint folder or file that is missing, incomplete or not ours."""


class GalenTokenizerError(GalenError, ValueError):
    """A tokenizer that cannot be trained, loaded or used as asked."""
