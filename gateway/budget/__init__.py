"""Per-team budgets: reserve before the upstream call, settle with the real usage."""

from gateway.budget.store import BudgetStore, Rejection, Reservation, WindowState
from gateway.budget.windows import window_bounds

__all__ = ["BudgetStore", "Rejection", "Reservation", "WindowState", "window_bounds"]
