"""Thin imperative shells: call the core, the one write function, then the pure commit rule."""
