"""Errors of the training tools, meant for people (see ``KidneyTumorSegLib.errors``)."""

from __future__ import annotations

from KidneyTumorSegLib.errors import KidneyTumorSegError

__all__ = ["ConfigError", "DatasetError", "KidneyTumorSegError"]


class DatasetError(KidneyTumorSegError):
    """A dataset folder or one of its cases cannot be used: missing, unreadable or inconsistent files."""


class ConfigError(KidneyTumorSegError):
    """A plan, split file, cache folder or option is invalid or does not fit the data it is used with."""
