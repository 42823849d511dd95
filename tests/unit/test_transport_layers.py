"""The transport is the only serving-side code that knows gRPC, and it uses only public grpcio API."""
from __future__ import annotations

import ast
import os

import pytest

from tests.support import ROOT

RUNTIME = os.path.join(ROOT, "runtime")
# The transport, and the application above it: the daemon (TLS credentials) and the operator CLIs (gRPC clients).
MAY_IMPORT_GRPC = {"transport", "app"}


def _modules():
    for folder, _, files in os.walk(RUNTIME):
        for name in files:
            if name.endswith(".py") and not name.endswith("_pb2.py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, RUNTIME), ast.parse(open(path, encoding="utf-8").read())


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_nothing_below_the_transport_imports_grpc():
    offenders = [rel for rel, tree in _modules() if rel.split(os.sep)[0] not in MAY_IMPORT_GRPC
                 and any(name == "grpc" or name.startswith("grpc.") or name.startswith("grpc_")
                         for name in _imports(tree))]
    assert offenders == []


def test_no_private_grpcio_name_is_used():
    # a private module or name of grpcio, or an attribute of grpc's objects that is private
    private_attrs = {"_raise_or_start_receive_message", "_look_for_request", "_rpc_event", "_cython", "_cygrpc",
                     "_next_message", "_rpc_state"}
    offenders = []
    for rel, tree in _modules():
        for name in _imports(tree):
            if name.startswith("grpc") and any(part.startswith("_") for part in name.split(".")):
                offenders.append((rel, name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private_attrs:
                offenders.append((rel, node.attr))
            if (isinstance(node, ast.Attribute) and node.attr == "condition"
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "_state"):
                offenders.append((rel, "_state.condition"))   # a request iterator's internal condition
    assert offenders == []


def test_every_error_kind_has_a_grpc_status():
    from macp_runtime.vocabulary.errors import Kind
    from macp_runtime.transport.status import KIND_STATUS

    assert set(KIND_STATUS) == set(Kind)


@pytest.mark.parametrize("default", ["max_streams"])
def test_stream_cap_default_holds_ten_thousand_agents(default):
    from macp_runtime.app.config import Config

    assert getattr(Config(), default) >= 10_000
