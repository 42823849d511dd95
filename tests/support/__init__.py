"""Helpers shared by the tests, imported as a package (`from tests.support import envelope, send`):
servers (`ServerProcess`), envelope helpers, and the kits for streams (`streamkit`), the console
(`consolekit`), kill -9 durability (`crashkit`) and a throw-away PostgreSQL (`pgkit`)."""
from .envelopes import bearer, commitment, display_name, envelope, new_session_id, send, start_payload
from .server import ROOT, ServerProcess, free_port

__all__ = ["ROOT", "ServerProcess", "bearer", "commitment", "display_name", "envelope", "free_port",
           "new_session_id", "send", "start_payload"]
