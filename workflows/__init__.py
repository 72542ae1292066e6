"""Prefect flows and deployments: the only package that imports Prefect.

Each flow is a thin wrapper over functions of the ``forecasting`` library, which are tested without Prefect.
"""
