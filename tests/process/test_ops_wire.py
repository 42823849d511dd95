"""Operating the daemon: health service, reflection, drain on SIGTERM."""
from __future__ import annotations

import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "macp.v1.MACPRuntimeService"


def list_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        for resp in stub.ServerReflectionInfo(iter([req]), timeout=10):
            return sorted(s.name for s in resp.list_services_response.service)
    return []


def test_health_reports_serving_for_server_and_service(runtime_server):
    stub = health_pb2_grpc.HealthStub(runtime_server.channel())
    for name in ("", SERVICE):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service_in_dev_mode(runtime_server):
    assert SERVICE in list_services(runtime_server.target)
    with grpc.insecure_channel(runtime_server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
        assert resp.file_descriptor_response.file_descriptor_proto   # describe works without .proto files


def test_reflection_can_be_switched_off(inprocess_factory):
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", "MACP_REFLECTION": "0"})
    with pytest.raises(grpc.RpcError) as info:
        list_services(srv.target)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_flips_to_not_serving_while_draining(server_factory):
    srv = server_factory(env={"MACP_MEMORY_ONLY": "1"})
    seen: list[int] = []
    ready = threading.Event()

    def watch():
        with grpc.insecure_channel(srv.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            try:
                for resp in stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30):
                    seen.append(resp.status)
                    ready.set()
            except grpc.RpcError:
                pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert ready.wait(10)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    t.join(10)
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen


def test_sigterm_under_load_loses_no_acknowledged_message(server_factory):
    import time as _time

    from tests.support.crashkit import Ledger, run_clients, verify_offline

    srv = server_factory()
    ledger = Ledger()
    stop = threading.Event()
    threads = run_clients(srv.target, ledger, stop, clients=4)
    _time.sleep(1.5)
    started = _time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(30)
    drained_in = _time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(15)
    assert code == 0
    assert drained_in < 15
    assert ledger.messages > 20
    verify_offline(srv.data_dir, ledger)       # every acknowledged message is on disk, once, in order
    assert "shutting down" in srv.log() and "stopped" in srv.log()
