"""pipeline: train, export, verify, benchmark and serve ResNet image classifiers."""

__version__ = "0.1.0"
