#!/usr/bin/env python3
"""Task mode example client: a planner delegates one task to a worker, who reports progress and
completes it (runtime.md §12).

Steps: planner SessionStart (participants planner, worker); planner TaskRequest t1 for the worker;
worker TaskAccept; worker TaskUpdate (in_progress, 0.5); worker TaskComplete with its output; planner
Commitment `task.completed`; GetSession as the worker.

Plain gRPC with the `macp-proto` bindings, plaintext, development credentials; start the server with
MACP_ALLOW_INSECURE=1 and no auth configuration, then

    python examples/task_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; the last line
is `RESOLVED session=<id>` when every step went as expected (exit 1 otherwise, 2 if unreachable).
"""
from __future__ import annotations

import sys

from macp.modes.task.v1 import task_pb2

from _client import RESOLVED, main

MODE = "macp.mode.task.v1"


def scenario(c) -> None:
    c.start("planner", ["planner", "worker"], "summarise the incident report")
    c.send("task_request", "planner", "TaskRequest", task_pb2.TaskRequestPayload(
        task_id="t1", title="Summarise incident 42", instructions="three bullet points",
        requested_assignee="worker", input=b"incident-42.log"))
    c.send("task_accept", "worker", "TaskAccept", task_pb2.TaskAcceptPayload(
        task_id="t1", assignee="worker", reason="available"))
    c.send("task_update", "worker", "TaskUpdate", task_pb2.TaskUpdatePayload(
        task_id="t1", status="in_progress", progress=0.5, message="log parsed"))
    c.send("task_complete", "worker", "TaskComplete", task_pb2.TaskCompletePayload(
        task_id="t1", assignee="worker", output=b"- disk full\n- alert late\n- fixed by rotation",
        summary="three findings"))
    c.commit("planner", "task.completed", "incident-42", "the worker delivered the summary")
    c.get_session("worker", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
