"""Adapters for other libraries' training loops (each an optional extra)."""
