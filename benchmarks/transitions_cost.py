#!/usr/bin/env python3
"""What `transitions` costs per session, measured two ways (the reason sessions hold only a phase).

  A. one shared Machine, every session added as a model (`machine.add_model(session)`), the usual
     transitions style: adding a model binds trigger methods onto it and scans the model list;
  B. what the runtime does: one shared Machine per mode with no models; a session is a slotted
     object holding its phase, and the engine fires the machine's event against it.

Prints time per session creation, bytes per session (tracemalloc) and µs per fired event.

  python benchmarks/transitions_cost.py --sessions 20000
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

from transitions import Machine

PHASES = ["Proposal", "Evaluation", "Voting", "Committed"]


def build_machine(model):
    m = Machine(model=model, states=PHASES, initial="Proposal", auto_transitions=False, send_event=True,
                model_attribute="phase")
    m.add_transition("Proposal", ["Proposal", "Evaluation"], "Evaluation")
    m.add_transition("Evaluation", "Evaluation", "Evaluation")
    m.add_transition("Objection", "Evaluation", "Evaluation")
    m.add_transition("Vote", ["Evaluation", "Voting"], "Voting")
    m.add_transition("Commitment", ["Evaluation", "Voting"], "Committed")
    return m


class Model:
    pass


class Slotted:
    __slots__ = ("phase",)

    def __init__(self):
        self.phase = "Proposal"


def measure(label, make, n, fire):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    sessions = [make() for _ in range(n)]
    create_s = time.perf_counter() - t0
    mem = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    t0 = time.perf_counter()
    for s in sessions:
        fire(s, "Proposal")
        fire(s, "Vote")
    fire_s = time.perf_counter() - t0
    print(f"{label:<44} create {create_s / n * 1e6:8.1f} us/session   {mem / n:8.0f} bytes/session   "
          f"fire {fire_s / (2 * n) * 1e6:6.2f} us/event")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=20000, help="sessions to create per variant")
    args = ap.parse_args()
    n = args.sessions

    shared = build_machine(None)

    def add_model():
        m = Model()
        shared.add_model(m)
        return m

    measure("A. add_model per session (bound triggers)", add_model, n, lambda s, ev: getattr(s, ev)())
    shared2 = build_machine(None)
    events = shared2.events
    measure("B. slotted phase + shared machine events", Slotted, n, lambda s, ev: events[ev].trigger(s))


if __name__ == "__main__":
    main()
