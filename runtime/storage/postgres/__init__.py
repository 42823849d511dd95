"""PostgreSQL backend (MACP_STORAGE_BACKEND=postgres): the shared session log, the document table, their
schema migrations and the notification bus between the instances (bus.py). Importing this package loads
the driver; `storage.open_store` does so only when used."""
from .bus import PostgresBus
from .store import LOG_CHANNEL, REGISTRY_CHANNEL, PostgresDocuments, PostgresStore

__all__ = ["PostgresStore", "PostgresDocuments", "PostgresBus", "LOG_CHANNEL", "REGISTRY_CHANNEL"]
