"""The console's event hub in-process: it observes the engine only while clients are connected, and a
client that falls behind gets `lagged` and its stream ends instead of growing without bound."""
from __future__ import annotations

import asyncio
import uuid

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.app.console import events
from macp_runtime.kernel.engine import Engine
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.app.console.facade import ConsoleView
from macp_runtime.storage import open_store

from tests.support import envelope, start_payload

DECISION = "macp.mode.decision.v1"


def _engine() -> Engine:
    store = open_store(True)
    store.open()
    return Engine(ModeRegistry.from_spec_dirs([]), PolicyRegistry(), store)


def test_hub_observes_only_while_clients_are_attached_and_cuts_off_a_lagging_client(monkeypatch):
    monkeypatch.setattr(events, "CLIENT_CAPACITY", 3)
    engine = _engine()
    alice = Identity(sender="alice")

    async def scenario():
        hub = events.Hub(engine, ConsoleView(engine, None), asyncio.get_running_loop())
        assert engine.observers == ()
        client = hub.attach(alice, None)
        assert engine.observers == (hub,)
        for _ in range(3):   # each SessionStart is two events (envelope, CREATED)
            env = envelope(DECISION, "SessionStart", str(uuid.uuid4()), "coordinator",
                           start_payload(["coordinator", "alice"]))
            engine.start_session(env, Identity(sender="coordinator"))
        await asyncio.sleep(0.05)
        items = []
        while not client.queue.empty():
            items.append(client.queue.get_nowait())
        assert len(items) == 5 and items[-1] is events.END
        assert items[-2].startswith(b"event: lagged")
        other = hub.attach(Identity(sender="mallory"), None)   # may read none of them
        engine.start_session(envelope(DECISION, "SessionStart", str(uuid.uuid4()), "coordinator",
                                      start_payload(["coordinator", "alice"])), Identity(sender="coordinator"))
        await asyncio.sleep(0.05)
        assert other.queue.empty()
        hub.detach(client)
        assert engine.observers == (hub,)
        hub.detach(other)
        assert engine.observers == ()
        hub.close()

    asyncio.run(scenario())
