"""Vocabulary: the words every layer shares (error kinds with MACP codes, sessions, ids, redaction, logging
helpers, a tiny change broadcaster). Imports nothing from the rest of the runtime."""
