"""The single source of gpart's version (read by ``pyproject.toml`` and ``gpart.__version__``)."""

__version__ = "0.1.0"
