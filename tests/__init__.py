"""The test suite, one folder per layer (README "Layout"): unit/, kernel/, wire/, process/, cluster/;
shared helpers in support/ (imported as `tests.support`), fixtures in conftest.py."""
