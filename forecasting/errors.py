"""Exception types shared by the whole library.

Every error raised at a boundary (files, configs, CLI, user datasets) is a :class:`ForecastingError`
whose message names the file, variable, dim or key and the value found, so the CLI can print it as is.
"""


class ForecastingError(Exception):
    """Base class for errors a user can act on; the CLI prints the message and exits non-zero."""


class SchemaError(ForecastingError, ValueError):
    """A dataset does not fit, and cannot be mapped onto, the canonical schema."""


class SourceError(ForecastingError, OSError):
    """A data source cannot be opened or read (missing, truncated, unreadable or inconsistent files)."""


class StoreError(ForecastingError):
    """A training store cannot be written, appended to or read as requested."""
