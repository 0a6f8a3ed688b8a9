"""The package version, in a module of its own so that nothing needs ``pipeline/__init__``'s
imports to read it."""

__version__ = "0.1.0"
