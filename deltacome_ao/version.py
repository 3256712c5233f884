"""The library version, recorded in every artifact and checkpoint it writes."""

__version__ = "0.2.0"
