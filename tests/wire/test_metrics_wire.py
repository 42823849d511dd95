"""Prometheus metrics: a scrape after a Decision flow shows the counters moved by the right amounts."""
from __future__ import annotations

import urllib.request

from macp.modes.decision.v1 import decision_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.support import commitment, envelope, free_port, new_session_id, send, start_payload

MODE = "macp.mode.decision.v1"


def scrape(addr: str) -> dict:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_a_decision_flow(server_factory):
    addr = f"127.0.0.1:{free_port()}"
    srv = server_factory(env={"MACP_METRICS_ADDR": addr})
    stub = srv.stub()
    before = scrape(addr)
    sid = new_session_id()
    steps = [("coord", "SessionStart", start_payload(["coord", "alice", "bob"])),
             ("coord", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="go")),
             ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="yes")),          # rejected
             ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="approve")),
             ("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="approve")),
             ("coord", "Commitment", commitment(action="deployment.approved"))]
    acks = [send(stub, envelope(MODE, t, sid, who, p)) for who, t, p in steps]
    assert [a.ok for a in acks] == [True, True, False, True, True, True]
    after = scrape(addr)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("macp_messages_accepted_total", mode=MODE, message_type="SessionStart") == 1
    assert delta("macp_messages_accepted_total", mode=MODE, message_type="Vote") == 2
    assert delta("macp_messages_accepted_total", mode=MODE, message_type="Commitment") == 1
    assert delta("macp_messages_rejected_total", mode=MODE, code="INVALID_ENVELOPE") == 1
    assert delta("macp_send_duration_seconds_count") == 6
    assert delta("macp_sessions_total", event="created") == 1
    assert delta("macp_sessions_total", event="resolved") == 1
    assert delta("macp_storage_append_duration_seconds_count") == 5     # the rejected Vote is never written
    # the five accepted messages, plus the runtime's own records (e.g. a checkpoint at resolution)
    assert 5 <= delta("macp_storage_synced_records_total") <= 7
    assert 1 <= delta("macp_storage_fsyncs_total") <= delta("macp_storage_synced_records_total")
    assert value(after, "macp_sessions_in_memory") >= 1
    assert value(after, "macp_sessions_open") == value(before, "macp_sessions_open")


def test_rate_limit_rejections_are_counted(server_factory):
    addr = f"127.0.0.1:{free_port()}"
    srv = server_factory(env={"MACP_METRICS_ADDR": addr, "MACP_SESSION_START_LIMIT_PER_MINUTE": "1",
                              "MACP_MEMORY_ONLY": "1"})
    stub = srv.stub()
    assert send(stub, envelope(MODE, "SessionStart", new_session_id(), "a", start_payload(["a"]))).ok
    ack = send(stub, envelope(MODE, "SessionStart", new_session_id(), "a", start_payload(["a"])))
    assert ack.error.code == "RATE_LIMITED"
    samples = scrape(addr)
    assert value(samples, "macp_rate_limited_total", bucket="session_start") == 1
    assert value(samples, "macp_messages_rejected_total", mode=MODE, code="RATE_LIMITED") == 1
    assert ("macp_storage_fsyncs_total", ()) not in samples          # memory store: no fsyncs to report


def test_metrics_are_off_by_default(runtime_server):
    # Nothing listens unless MACP_METRICS_ADDR is set; the server log says where metrics are served.
    assert "Prometheus endpoint" not in runtime_server.log()
