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


# What `json.loads` raises on hostile text. JSONDecodeError and UnicodeDecodeError are ValueErrors, and so
# is an integer literal longer than Python converts (4,300 digits); nesting deeper than the recursion limit
# (`[[[[...`) raises RecursionError. Every parse of untrusted JSON catches all of these.
JSON_ERRORS = (ValueError, RecursionError)


def read_json(path, expect: type, hint: str, error: type[GalenError] = GalenInputError):
    """Parse a JSON file whose top level must be `expect` (dict or list), or raise `error` saying
    what is wrong with it followed by `hint` (what to do about it). Used for every JSON file a user
    hands to Galen, so a broken download reads the same everywhere."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except JSON_ERRORS as e:
        raise error(f"{path} is not valid JSON ({e}); {hint}") from e
    if not isinstance(data, expect):
        raise error(f"{path} must hold a JSON {'object' if expect is dict else 'list'}, found a JSON "
                    f"{type(data).__name__}; {hint}")
    return data
