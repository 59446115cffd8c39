"""The package version: written here once (pyproject.toml reads it; see ``tool.hatch.version``)."""

__version__ = "0.1.0"
