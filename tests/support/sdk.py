"""Setup shared by the tests that drive sessions with the official SDK (macp-sdk-python, `macp_sdk`):
dev-mode identities, a client on a test server, and a raw GetSession to check outcomes independently.

`client` is a module-scoped fixture (an SDK client as the coordinator on the module's `runtime_server`):
a test module imports it by name to use it."""
from __future__ import annotations

import contextlib
import time

import pytest
from macp.v1 import core_pb2, envelope_pb2
from macp_sdk import AuthConfig, MacpClient

from tests.support import bearer

COORD = AuthConfig.for_dev_agent("coordinator")
ALICE = AuthConfig.for_dev_agent("alice")
BOB = AuthConfig.for_dev_agent("bob")
CAROL = AuthConfig.for_dev_agent("carol")
ADMIN = AuthConfig.for_dev_agent("admin")

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
EXPIRED = envelope_pb2.SESSION_STATE_EXPIRED


@contextlib.contextmanager
def sdk_client(server, auth: AuthConfig = COORD):
    """A MacpClient on `server` (plaintext, 10 s default timeout), closed on exit."""
    with MacpClient(target=server.target, allow_insecure=True, auth=auth, default_timeout=10) as client:
        yield client


def metadata_reader(server, default_who: str):
    """`read(session_id, who=default_who)`: the session's SessionMetadata by a raw GetSession as `who`."""
    stub = server.stub()

    def read(session_id: str, who: str = default_who) -> core_pb2.SessionMetadata:
        return stub.GetSession(core_pb2.GetSessionRequest(session_id=session_id), metadata=bearer(who)).metadata

    return read


@pytest.fixture(scope="module")
def client(runtime_server):
    with sdk_client(runtime_server) as c:
        yield c


def implicit_handoff_policy():
    """A handoff policy (`handoff.implicit`) whose offers are accepted implicitly after 300 ms."""
    from macp_sdk.policy import HandoffAcceptanceRules, build_handoff_policy

    return build_handoff_policy("handoff.implicit", "", acceptance=HandoffAcceptanceRules(
        implicit_accept_timeout_ms=300))


def offer_past_its_implicit_accept(client: MacpClient, coord: AuthConfig, policy):
    """Register `policy` (implicit_handoff_policy()), start a handoff coord -> alice under it, offer h1,
    let the 300 ms pass and send the message that triggers the runtime's recorded implicit accept.
    Returns the HandoffSession."""
    from macp_sdk import HandoffSession

    assert client.register_policy(policy, auth=ADMIN).ok
    session = HandoffSession(client, auth=coord, policy_version="handoff.implicit")
    assert session.start(intent="hand over", participants=["coord", "alice"], ttl_ms=60_000).ok
    assert session.offer("h1", "alice", scope="on-call").ok
    time.sleep(0.45)
    assert session.add_context("h1", content_type="text/plain", context=b"runbook").ok   # the trigger
    return session
