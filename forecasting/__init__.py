"""Data-driven probabilistic weather forecasting: ingest, train, forecast, verify, downscale.

The library never imports Prefect; orchestration lives in the separate ``workflows`` package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forecasting")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
