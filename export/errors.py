"""Exceptions of the exporter."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.exporter import ExportReport


class ExportError(Exception):
    """A model could not be exported, or the exported graph failed a check."""


class VerificationError(ExportError):
    """An exported model's outputs or accuracy are outside the tolerance.

    ``report`` lists the files that passed before a variant failed, or is None
    when the fp32 file failed.
    """

    def __init__(self, message: str, report: ExportReport | None = None) -> None:
        super().__init__(message)
        self.report = report
