"""`galen` for a job whose project folder was uploaded (`galen submit`): `galen.model`,
`galen.flows` and `galen.serve` are the upload's own `model/`, `flows/` and `serve/` folders, found
first because `galen submit` puts this folder at the head of the job's PYTHONPATH."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[3])]
