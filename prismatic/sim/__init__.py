"""Closed-loop evaluation in the LIBERO simulator (optional extra `libero`; imported only by its own entry points)."""
