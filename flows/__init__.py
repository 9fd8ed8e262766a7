"""Galen's pipeline: the stages `dvc repro` runs and the `galen` command line."""
