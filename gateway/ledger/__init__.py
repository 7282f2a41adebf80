"""The usage ledger: one append-only record per finished request, and reports over it."""

from gateway.ledger.records import (
    Charge,
    Ledger,
    LedgerRecord,
    LedgerWriter,
    ReportReader,
    ReportRow,
)

__all__ = ["Charge", "Ledger", "LedgerRecord", "LedgerWriter", "ReportReader", "ReportRow"]
