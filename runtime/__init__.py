"""macp-runtime for Python: a MACP runtime whose modes are YAML specs run by one generic engine."""
from importlib import metadata as _metadata

# One version source: the package metadata (pyproject.toml's project.version), for the start-up log,
# `macp-runtime --version` and the description Initialize returns. Initialize's runtime_info.version is
# something else: the reference runtime level whose answers this one reproduces (README, "Versions").
try:
    __version__ = _metadata.version("macp-runtime")
except _metadata.PackageNotFoundError:   # imported from a source tree that was never installed
    __version__ = "0+unknown"
