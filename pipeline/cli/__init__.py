"""``python -m pipeline``: the click app (``app``) and its terminal tables (``render``)."""

from pipeline.cli.app import cli, main

__all__ = ["cli", "main"]
