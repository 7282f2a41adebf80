"""The usage ledger: one append-only record per finished request, and reports over it."""

from gateway.ledger.records import (
    CaptureReader,
    Charge,
    Ledger,
    LedgerReader,
    LedgerRecord,
    LedgerWriter,
    ReportReader,
    ReportRow,
    RequestReader,
)

__all__ = [
    "CaptureReader",
    "Charge",
    "Ledger",
    "LedgerReader",
    "LedgerRecord",
    "LedgerWriter",
    "ReportReader",
    "ReportRow",
    "RequestReader",
]
