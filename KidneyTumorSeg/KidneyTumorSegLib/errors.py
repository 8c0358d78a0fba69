"""Errors meant for people.

Every error the core raises for a user mistake (a bad file, a bad option, an unusable model) is a
``KidneyTumorSegError`` whose message says what is wrong, with which file, and what to do. The CLI prints
that message on one line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KidneyTumorSegError(Exception):
    """A problem the user can fix; the message is complete and printable as is."""


class InputImageError(KidneyTumorSegError):
    """The input image is missing, unreadable, or not a CT volume the model can segment."""


class ModelFileError(KidneyTumorSegError):
    """The model file is missing, corrupt, unsafe, or does not match its metadata."""


class OutputError(KidneyTumorSegError):
    """The output cannot be written where it was asked for."""
