"""`gateway serve --workers N`: N gateway processes on one port, under one supervisor that
serves the admin listener for all of them (CONTRACT section 9)."""

from gateway.workers.supervisor import supervise

__all__ = ["supervise"]
