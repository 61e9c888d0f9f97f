"""Renderers: one module per report format, each turning a Report into text."""

#: The values of --format, defined once for every command.
FORMATS: tuple[str, ...] = ("table", "json")
