"""Recurrence operators. Each version's op lives in its own package beside its reference."""
