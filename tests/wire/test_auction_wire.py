"""The sealed-bid auction (examples/specs/sealed_bid.yaml, YAML only) over the wire, and issue 15's
reasons: every refusal of its session tells the client why — in the Ack's `error.message`
(`<display name>: <reason>`) and `error.details` (`{"reason": ...}`), in StreamSession's inline error
frames, and in the official SDK's exceptions.
"""
from __future__ import annotations

import json
import os

import pytest
from macp_sdk import AuthConfig, MacpClient
from macp_sdk.envelope import build_envelope, new_session_id as sdk_session_id
from macp_sdk.errors import MacpAckError

from tests.support import ROOT, envelope, new_session_id, send, start_payload
from tests.support.streamkit import Duplex

SPECS = os.path.join(ROOT, "examples", "specs")
MODE = "ext.sealed_bid.v1"
OPEN, RESOLVED = 1, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.support.inprocess import InProcessServer

    # the default profile, `current`, sends refusal reasons (v0.4.0 answers exactly as the reference: below)
    srv = InProcessServer(str(tmp_path_factory.mktemp("auction") / "data"),
                          env={"MACP_SPECS_DIR": SPECS, "MACP_PROTOCOL_PROFILE": "current"}).start()
    yield srv
    srv.kill()


def test_under_v040_refusals_are_exactly_the_references(tmp_path):
    from tests.support.inprocess import InProcessServer

    srv = InProcessServer(str(tmp_path / "data"), env={"MACP_SPECS_DIR": SPECS, "MACP_PROTOCOL_PROFILE": "v0.4.0"}).start()
    try:
        a = Auction(srv.stub())
        assert a.send("ana", "Bid", js({"amount": 10})).ok
        ack = a.send("ana", "Bid", js({"amount": 11}))
        assert (ack.ok, ack.error.code, ack.error.message, ack.error.details) == (False, "INVALID_ENVELOPE",
                                                                                  "InvalidPayload", b"")
    finally:
        srv.kill()


def js(obj) -> bytes:
    return json.dumps(obj).encode()


class Auction:
    def __init__(self, stub, participants=("ana", "ben", "cy"), initiator="host"):
        self.stub, self.sid = stub, new_session_id()
        self.start_ack = self.send(initiator, "SessionStart", start_payload(list(participants)))

    def send(self, sender, mtype, payload):
        return send(self.stub, envelope(MODE, mtype, self.sid, sender, payload))


def refused(ack, code: str, message: str) -> None:
    """The exact refusal text: code unchanged, message `<display name>: <reason>`, details the reason."""
    assert not ack.ok, ack
    assert (ack.error.code, ack.error.message) == (code, message), ack.error
    display, _, reason = message.partition(": ")
    assert json.loads(ack.error.details) == {"reason": reason}


def test_a_full_auction_resolves_with_the_winner(server):
    a = Auction(server.stub())
    assert a.start_ack.ok, a.start_ack
    assert a.send("ana", "Bid", js({"amount": 120})).ok
    assert a.send("ben", "Bid", js({"amount": 95.5, "note": "final"})).ok
    assert a.send("host", "Close", js({})).ok
    ack = a.send("host", "Commitment", js({"winner": "ana", "amount": 120}))
    assert (ack.ok, ack.session_state) == (True, RESOLVED), ack


def test_every_refusal_tells_the_client_why(server):
    a = Auction(server.stub())
    assert a.send("ana", "Bid", js({"amount": 10})).ok
    refused(a.send("ana", "Bid", js({"amount": 11})), "INVALID_ENVELOPE",
            "InvalidPayload: each participant bids exactly once")
    refused(a.send("ben", "Bid", js({"amount": 0})), "INVALID_ENVELOPE",
            "InvalidPayload: the amount must be greater than 0")
    refused(a.send("ben", "Bid", js({"amount": "lots"})), "INVALID_ENVELOPE",
            "InvalidPayload: payload field 'amount' must be a number")
    refused(a.send("ben", "Bid", js({"note": "no amount"})), "INVALID_ENVELOPE",
            "InvalidPayload: payload field 'amount' is required")
    refused(a.send("host", "Bid", js({"amount": 5})), "FORBIDDEN", "Forbidden: 'host' may not send Bid")
    refused(a.send("host", "Commitment", js({"winner": "ana", "amount": 10})), "INVALID_ENVELOPE",
            "InvalidPayload: Commitment is not accepted in phase Bidding")
    assert a.send("host", "Close", js({})).ok
    refused(a.send("ben", "Bid", js({"amount": 12})), "INVALID_ENVELOPE",
            "InvalidPayload: Bid is not accepted in phase Closed")
    refused(a.send("host", "Commitment", js({"winner": "ana", "amount": 10})), "INVALID_ENVELOPE",
            "InvalidPayload: the session is not ready for a Commitment: at least 2 different senders have sent Bid")


def test_winner_rules(server):
    a = Auction(server.stub())
    assert a.send("ana", "Bid", js({"amount": 10})).ok
    assert a.send("ben", "Bid", js({"amount": 30})).ok
    assert a.send("host", "Close", js({})).ok
    refused(a.send("host", "Commitment", js({"winner": "cy", "amount": 30})), "INVALID_ENVELOPE",
            "InvalidPayload: the winner must be one of the bidders")
    refused(a.send("host", "Commitment", js({"winner": "ana", "amount": 10})), "INVALID_ENVELOPE",
            "InvalidPayload: the winner must have bid the highest amount")
    refused(a.send("host", "Commitment", js({"amount": 30})), "INVALID_ENVELOPE",
            "InvalidPayload: payload field 'winner' is required")
    assert a.send("host", "Commitment", js({"winner": "ben", "amount": 30})).ok


def test_session_start_requirements_say_which(server):
    a = Auction(server.stub(), participants=("ana",))
    refused(a.start_ack, "INVALID_ENVELOPE",
            "InvalidPayload: SessionStart refused by ext.sealed_bid.v1: the session declares at least 2 participants")
    b = Auction(server.stub(), participants=("ana", "host"))
    refused(b.start_ack, "INVALID_ENVELOPE",
            "InvalidPayload: SessionStart refused by ext.sealed_bid.v1: the initiator is not among the participants")


def test_inline_stream_errors_carry_the_same_details(server):
    a = Auction(server.stub())
    assert a.send("ana", "Bid", js({"amount": 10})).ok
    d = Duplex(server.stub(), "ana")
    try:
        d.send(envelope(MODE, "Bid", a.sid, "ana", js({"amount": 11})))
        frame = d.recv()
        assert frame.HasField("error"), frame
        err = frame.error
        # under the current profile an inline frame carries what the Ack's error would (current.md §8.4)
        assert (err.code, err.message, err.session_id) == (
            "INVALID_ENVELOPE", "InvalidPayload: each participant bids exactly once", a.sid)
        assert json.loads(err.details) == {"reason": "each participant bids exactly once"}
    finally:
        d.close()


def test_the_sdk_shows_the_reason(server):
    sid = sdk_session_id()
    with MacpClient(target=server.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("host"),
                    default_timeout=10) as host:
        host.send(build_envelope(mode=MODE, message_type="SessionStart", session_id=sid, sender="host",
                                 payload=start_payload(["ana", "ben"]).SerializeToString()))
        ana = AuthConfig.for_dev_agent("ana")
        host.send(build_envelope(mode=MODE, message_type="Bid", session_id=sid, sender="ana", payload=js({"amount": 3})),
                  auth=ana)
        with pytest.raises(MacpAckError) as info:
            host.send(build_envelope(mode=MODE, message_type="Bid", session_id=sid, sender="ana",
                                     payload=js({"amount": 4})), auth=ana)
        assert str(info.value) == "INVALID_ENVELOPE: InvalidPayload: each participant bids exactly once"
        assert info.value.failure.message == "InvalidPayload: each participant bids exactly once"
        with pytest.raises(MacpAckError) as info:
            host.send(build_envelope(mode=MODE, message_type="Commitment", session_id=sid, sender="host",
                                     payload=js({"winner": "ana", "amount": 3})))
        assert "Commitment is not accepted in phase Bidding" in str(info.value)
