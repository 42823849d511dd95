#!/usr/bin/env python3
"""What pure judging costs (issue 13 point 2): the mode state copied lazily along the paths hooks touch
(kernel.interpreter.StateCopy / ListCopy: each container shallow-copied in C when first reached) before
effects run.

Drives the kernel in-process (memory store, no transport) with the decision mode: per session a
SessionStart, N Proposals, N Evaluations, a Vote per participant and a Commitment. Runs the same
workload twice, alternating rounds: as shipped (effects on a copy of the state, applied only after
the append) and with the copy replaced by the live state (what the old in-place path did), and
prints µs per message and the ratio. Also the cost of copy_state alone on the largest state.

  python benchmarks/judging_cost.py --sessions 2000 --proposals 5
"""
from __future__ import annotations

import argparse
import time
import uuid

from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.kernel import interpreter
from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.storage import MemoryStore

MODE = "macp.mode.decision.v1"


def env(sid, mtype, payload):
    return envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype, message_id=str(uuid.uuid4()),
                                 session_id=sid, sender="", timestamp_unix_ms=int(time.time() * 1000),
                                 payload=payload.SerializeToString())


def workload(engine, sessions: int, proposals: int) -> int:
    alice, bob, coord = Identity("alice"), Identity("bob"), Identity("coord")
    n = 0
    for _ in range(sessions):
        sid = str(uuid.uuid4())
        engine.start_session(env(sid, "SessionStart", core_pb2.SessionStartPayload(
            participants=["alice", "bob"], mode_version="1.0.0", configuration_version="c", ttl_ms=600_000)), coord)
        for i in range(proposals):
            engine.process_message(env(sid, "Proposal", decision_pb2.ProposalPayload(proposal_id=f"p{i}", option="o")),
                                   alice)
            engine.process_message(env(sid, "Evaluation", decision_pb2.EvaluationPayload(
                proposal_id=f"p{i}", recommendation="APPROVE", confidence=0.9, reason="r")), bob)
        for who in (alice, bob):
            engine.process_message(env(sid, "Vote", decision_pb2.VotePayload(proposal_id="p0", vote="APPROVE")), who)
        engine.process_message(env(sid, "Commitment", core_pb2.CommitmentPayload(
            commitment_id="c", action="decision.selected", authority_scope="s", reason="r", mode_version="1.0.0",
            configuration_version="c", policy_version="policy.default", outcome_positive=True)), coord)
        n += 4 + 2 * proposals
    return n


def run(copy: bool, sessions: int, proposals: int) -> float:
    original = interpreter.copy_state, interpreter.StateCopy
    if not copy:   # effects straight on the live state, as before pure judging
        interpreter.copy_state = lambda state: state
        interpreter.StateCopy = lambda state, txn: state
    try:
        store = MemoryStore()
        store.open()
        engine = Engine(ModeRegistry.from_spec_dirs(), PolicyRegistry(), store)
        t0 = time.perf_counter()
        n = workload(engine, sessions, proposals)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        interpreter.copy_state, interpreter.StateCopy = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--proposals", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with_copy, without = [], []
    for _ in range(args.rounds):
        with_copy.append(run(True, args.sessions, args.proposals))
        without.append(run(False, args.sessions, args.proposals))
    a, b = min(with_copy), min(without)
    print(f"decision mode, {args.proposals} proposals per session, best of {args.rounds} rounds of "
          f"{args.sessions} sessions")
    print(f"  with the copy (shipped):  {a:7.1f} us/message")
    print(f"  without (in place):       {b:7.1f} us/message")
    print(f"  ratio: {a / b:.3f}  (copy cost {a - b:+.1f} us/message)")
    state = {"proposals": {f"p{i}": {"proposal_id": f"p{i}", "option": "o", "rationale": "", "sender": "alice"}
                           for i in range(args.proposals)},
             "evaluations": [{"proposal_id": f"p{i}", "recommendation": "APPROVE", "confidence": 0.9,
                              "reason": "r", "sender": "bob"} for i in range(args.proposals)],
             "objections": [], "votes": {"p0": {"alice": {"vote": "APPROVE"}, "bob": {"vote": "APPROVE"}}}}
    t0 = time.perf_counter()
    for _ in range(20_000):
        interpreter.copy_state(state)
    print(f"  a full deep copy of the final state would cost: {(time.perf_counter() - t0) / 20_000 * 1e6:.1f} us "
          f"(a message copies only the containers its hooks reach)")


if __name__ == "__main__":
    main()
