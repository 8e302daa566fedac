"""The package version (its own module so the CLI reads it without the package facade)."""

__version__ = "0.1.0"
