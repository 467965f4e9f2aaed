"""The one exception type of the data layer.

Every validation problem in a user's data raises :class:`DataError`, a ``ValueError``
whose message and attributes say WHERE the problem is: the file (or hub id), the 0-based
row index inside that file, and the field (column) involved. Configuration mistakes
(a negative fraction, ``max_prompt_len >= max_total_len``) raise plain ``ValueError``.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data. ``file``, ``row`` (0-based, in that file) and ``field`` may be None
    when not applicable; ``reason`` is the message without the location prefix."""

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)

    def __reduce__(self):  # picklable across Ray actor boundaries
        return (_rebuild, (self.reason, self.file, self.row, self.field))


def _rebuild(reason, file, row, field):
    return DataError(reason, file=file, row=row, field=field)
