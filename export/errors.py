"""Exceptions of the exporter."""

from __future__ import annotations


class ExportError(Exception):
    """A model could not be exported, or the exported graph failed a check."""


class VerificationError(ExportError):
    """An exported model's outputs or accuracy are outside the tolerance."""
