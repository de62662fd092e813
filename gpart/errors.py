"""gpart's exception family.

Every error gpart raises on bad input is a :class:`GPartError`, so ``except gpart.GPartError``
catches them all; the subclasses say which part of the input was wrong and also derive from the
matching built-in (``ValueError`` or ``RuntimeError``) so generic handlers keep working.

Each message names the offending value, the rule it broke, and how to fix it.

>>> import gpart
>>> issubclass(gpart.ConfigError, gpart.GPartError) and issubclass(gpart.ConfigError, ValueError)
True
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FormatError",
    "GPartError",
    "LayoutError",
    "StateError",
    "TargetError",
]


class GPartError(Exception):
    """Base class of every error raised by gpart."""


class ConfigError(GPartError, ValueError):
    """An option has a bad type or value (``d``, ``seed``, ``dropout``, ``bias``, ...)."""


class TargetError(GPartError, ValueError):
    """The target selection is unusable: nothing matched, a non-floating or tied tensor, ..."""


class StateError(GPartError, RuntimeError):
    """The model is in the wrong state for the call (gpart applied twice, or not applied)."""


class FormatError(GPartError, ValueError):
    """An adapter file is missing, unreadable, or its contents break the format's rules."""


class LayoutError(FormatError):
    """An adapter file was saved for a different target layout or settings than the model's."""
