#!/usr/bin/env python3
"""Join a running session late with StreamSession and watch it: replayed history, then live envelopes.

A background sender drives a Decision session (coordinator starts it with alice and bob; alice
proposes p1..p4, evaluates p4; alice and bob vote; coordinator commits). Once three envelopes are in,
bob joins as a *passive observer*: one StreamSession whose only frame is
`subscribe_session_id=<session>, after_sequence=2`, i.e. "everything from the third log entry on".
The runtime replays what is already in the history and then streams the rest as it is accepted, with
no gap and no duplicate at the switch-over, which this example checks against the sender's acks.

    scripts/serve                                   # in one terminal
    .venv/bin/python examples/stream_observer.py    # in another

Each received envelope is printed as `[replay|live] #<log index> <type> from <sender>` (`replay`:
accepted before the subscribe frame was sent). Exit status 0 when the observer saw exactly the
expected envelopes and the session ended RESOLVED (last line `RESOLVED session=<id>`).
"""
from __future__ import annotations

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from macp.modes.decision.v1 import decision_pb2  # noqa: E402
from macp.v1 import core_pb2  # noqa: E402

from _client import RESOLVED, Client, StepFailed, main  # noqa: E402
from _lines import install  # noqa: E402

MODE = "macp.mode.decision.v1"
AFTER_SEQUENCE = 2


def scenario(client: Client) -> None:
    accepted: list[str] = []          # message ids in log order, as the sender's acks arrive
    three_in = threading.Event()
    sender_error: list[BaseException] = []

    def send(label, sender, mtype, payload, expect_state=None):
        kwargs = {} if expect_state is None else {"expect_state": expect_state}
        ack = client.send(label, sender, mtype, payload, **kwargs)
        accepted.append(ack.message_id)
        if len(accepted) == 3:
            three_in.set()

    def drive():
        try:
            accepted.append(client.start("coordinator", ["alice", "bob"], "pick a deployment window").message_id)
            for i in range(1, 5):
                send(f"proposal p{i}", "alice", "Proposal",
                     decision_pb2.ProposalPayload(proposal_id=f"p{i}", option=f"window {i}", rationale="quiet hours"))
                time.sleep(0.15)
            send("evaluation", "alice", "Evaluation",
                 decision_pb2.EvaluationPayload(proposal_id="p4", recommendation="APPROVE", confidence=0.9))
            send("vote alice", "alice", "Vote", decision_pb2.VotePayload(proposal_id="p4", vote="APPROVE"))
            send("vote bob", "bob", "Vote", decision_pb2.VotePayload(proposal_id="p4", vote="APPROVE"))
            time.sleep(0.15)
            ack = client.commit("coordinator", "deployment.window.selected", "release-management", "both approve")
            accepted.append(ack.message_id)
        except BaseException as exc:  # reported by the main thread
            sender_error.append(exc)
            three_in.set()

    sender = threading.Thread(target=drive, name="sender")
    sender.start()
    three_in.wait(client.timeout)
    if sender_error:
        raise sender_error[0]
    known_at_join = len(accepted)
    print(f"[observer] bob joins with after_sequence={AFTER_SEQUENCE} ({known_at_join} envelopes accepted so far)")

    stop = threading.Event()

    def frames():
        yield core_pb2.StreamSessionRequest(subscribe_session_id=client.session_id, after_sequence=AFTER_SEQUENCE)
        stop.wait()                   # keep the request side open: a passive observer must not half-close

    seen: list[str] = []
    call = client.stub.StreamSession(frames(), metadata=client.credentials("bob"))
    try:
        for index, response in enumerate(call, start=AFTER_SEQUENCE):
            if response.HasField("error"):
                raise StepFailed(f"inline stream error: {response.error.code}")
            env = response.envelope
            seen.append(env.message_id)
            where = "replay" if index < known_at_join else "live"
            print(f"[{where}] #{index} {env.message_type} from {env.sender}")
            if env.message_type == "Commitment":
                break
    finally:
        stop.set()
        call.cancel()
    sender.join()
    if sender_error:
        raise sender_error[0]
    expected = accepted[AFTER_SEQUENCE:]
    if seen != expected:
        raise StepFailed(f"observer saw {len(seen)} envelopes, expected {len(expected)} in order "
                         "(a gap or a duplicate at the replay/live switch-over)")
    print(f"[observer] {len(seen)} envelopes, in order, none missing, none twice")
    client.get_session("bob", RESOLVED)


if __name__ == "__main__":
    install()
    sys.exit(main(__doc__, MODE, scenario))
