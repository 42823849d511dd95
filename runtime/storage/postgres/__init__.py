"""PostgreSQL backend (MACP_STORAGE_BACKEND=postgres): the shared session log, the document table and
their schema migrations. Importing this package loads the driver; `storage.open_store` does so only when used."""
from .store import LOG_CHANNEL, REGISTRY_CHANNEL, PostgresDocuments, PostgresStore

__all__ = ["PostgresStore", "PostgresDocuments", "LOG_CHANNEL", "REGISTRY_CHANNEL"]
