"""The project's own errors: each message is meant for a person to read.

Every error the project raises on purpose derives from `SpaError`, so a front end catches one
class: the CLI prints the message on one line of stderr and exits 2; the UI shows it as it is.
"""

from __future__ import annotations


class SpaError(Exception):
    """Base class of the project's own errors."""


class ConfigError(SpaError, ValueError):
    """A setting, option or input that cannot work as given (also a ValueError, for callers that
    validate generically)."""
