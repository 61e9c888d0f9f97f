"""Renderers: a Report in, a string out. One module per format (pip-audit style)."""
