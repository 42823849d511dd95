"""The servicer, composed: the shared pieces every handler uses (`Transport`) and the table of RPCs
to small handlers. RPCs of the service that are not in the table answer UNIMPLEMENTED."""
from __future__ import annotations

import grpc
from google.protobuf import message_factory
from macp.v1 import core_pb2

from .admission import Admission
from .convert import encode
from .discovery import DiscoveryHandler
from .loop import Offload, Wakeups
from .policies import PolicyHandler
from .receipts import ReceiptHandler
from .registry import RegistryHandler
from .sessions import UNDECODABLE_DETAILS, MessageHandler, SessionHandler
from .streams import StreamHandler

SERVICE_NAME = "macp.v1.MACPRuntimeService"


class _Undecodable:
    """What the request deserializer returns for bytes that do not parse: the handler's guard
    answers INVALID_ARGUMENT (the client sent bytes that are not the request message; grpc's own
    deserialization failure would say INTERNAL, as if the server were broken)."""

    @staticmethod
    def HasField(name: str) -> bool:
        return False


UNDECODABLE = _Undecodable()


def _decoder(request_type):
    parse = request_type.FromString

    def decode(data: bytes):
        try:
            return parse(data)
        except Exception:
            return UNDECODABLE
    return decode


def _guard_unary(behaviour):
    async def call(request, context):
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_DETAILS)
        return await behaviour(request, context)
    return call


def _guard_stream(behaviour):
    async def call(request, context):
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_DETAILS)
        async for frame in behaviour(request, context):
            yield frame
    return call


class Transport:
    """What the handlers share: the engine, admission, the kernel-call runner and the loop's wakeups."""

    def __init__(self, engine, admission: Admission, offload: Offload, wakeups: Wakeups):
        self.engine = engine
        self.admission = admission
        self.offload = offload
        self.wakeups = wakeups
        self.messages = MessageHandler(self)
        self.handlers = (self.messages, SessionHandler(self), StreamHandler(self), DiscoveryHandler(self),
                         RegistryHandler(self), PolicyHandler(self), ReceiptHandler(self))


def method_handlers(t: Transport) -> dict[str, grpc.RpcMethodHandler]:
    """Every RPC some handler implements, with the request types of the service descriptor and a
    response serializer that passes pre-encoded frames through."""
    service = core_pb2.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[1]]
    methods = {}
    for method in service.methods:
        behaviour = next((getattr(h, method.name) for h in t.handlers if hasattr(h, method.name)), None)
        if behaviour is None:
            continue
        request_type = message_factory.GetMessageClass(method.input_type)
        if method.client_streaming and method.server_streaming:   # StreamSession checks each frame
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make, behaviour = grpc.unary_stream_rpc_method_handler, _guard_stream(behaviour)
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
            if not getattr(behaviour, "guards_undecodable", False):
                behaviour = _guard_unary(behaviour)
        methods[method.name] = make(behaviour, request_deserializer=_decoder(request_type),
                                    response_serializer=encode)
    return methods


# Pre-registered with grpc core (it matches their path itself). Only the per-message RPC: grpc.aio's
# server waits for the next call of every registered method at once (one `asyncio.wait` over one
# future per registered method, per call accepted), so registering all ~30 methods, as generated
# code does, cost ~30 µs of CPU per call; the others are found through the generic handler.
REGISTERED = ("Send",)


def add_to_server(t: Transport, server) -> None:
    methods = method_handlers(t)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    server.add_registered_method_handlers(SERVICE_NAME, {name: methods[name] for name in REGISTERED})
