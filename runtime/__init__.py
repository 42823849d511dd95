"""macp-runtime for Python: a MACP runtime whose modes are YAML specs run by one generic engine."""
__version__ = "0.1.0"
