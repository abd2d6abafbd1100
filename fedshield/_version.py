"""The version, in a module of its own: the rooms may read it without importing the package's
top (fedshield/__init__.py names the API, which no room may import: pyproject's contracts)."""

__version__ = "0.2.0"
