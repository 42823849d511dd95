"""GetDecisionReceipt, GetReceiptKeys and WhatIfReplay (current.md §14, §15).

Thin: the work is in runtime/receipts.py, runtime/receipt_keys.py and runtime/whatif.py. Served under
the `current` profile (which advertises them in Initialize); under `v0.4.0` they answer UNIMPLEMENTED,
as the v0.4.0 reference does. Every failure carries the `macp-error-code` trailer (current.md §3.2).
"""
from __future__ import annotations

import logging

import grpc
from macp.v1 import core_pb2

from ..kernel.receipts import ReceiptUnavailable
from ..kernel.whatif import WhatIfError, what_if
from ..vocabulary.errors import PERMISSION_DENIED, Kind, MacpError, StatusError
from .commit import _durable
from .status import abort, abort_status_error, error_status

log = logging.getLogger("macp_runtime.receipts")

_STATUS_OF_CODE = {"INVALID_POLICY_DEFINITION": grpc.StatusCode.INVALID_ARGUMENT,
                   "HISTORY_UNAVAILABLE": grpc.StatusCode.FAILED_PRECONDITION}
UNIMPLEMENTED_DETAILS = "Method not found!"   # what grpc says for a method the server does not have


class ReceiptHandler:
    def __init__(self, t):
        self.t = t

    async def _served(self, context, feature: str):
        profile = self.t.engine.profile
        if not profile.features.get(feature):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, UNIMPLEMENTED_DETAILS)
        return profile

    async def _readable(self, request, context, profile, *, managers: bool):
        """Steps 1–4 of §14.1 / §15.2: authenticated caller, non-empty id, known session, access
        (participants, initiator, observers; for WhatIfReplay also registry managers)."""
        t = self.t
        identity = await t.admission.identity(context)
        if identity is None:
            await abort(context, profile, grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", "UNAUTHENTICATED")
        if not request.session_id:
            await abort(context, profile, grpc.StatusCode.INVALID_ARGUMENT,
                        "INVALID_REQUEST: session_id must not be empty", "INVALID_REQUEST")
        if managers and not t.admission.rate_allows(identity, False):
            # a replay judges a whole history twice: it counts against the caller's message rate
            # (MACP_MESSAGE_LIMIT_PER_MINUTE) like a Send
            await abort(context, profile, *error_status(MacpError(Kind.RateLimited)), Kind.RateLimited.code)
        engine = t.engine
        try:
            session = await t.offload(engine.lookup, request.session_id)
            if not (engine.may_read(session, identity) or (managers and identity.can_manage_mode_registry)):
                raise StatusError(PERMISSION_DENIED, "FORBIDDEN: session access denied")
        except StatusError as exc:
            await abort_status_error(context, profile, exc)
        except MacpError as exc:
            await abort(context, profile, *error_status(exc), exc.code)
        # Deferred commit: the session's state may be ahead of its durable log for a moment. A receipt
        # attests a Commitment and a replay reads the log, so both wait until it is durable.
        error = await _durable(t, request.session_id)
        if error is not None:
            failure = MacpError(Kind.StorageFailed, detail=str(error))
            await abort(context, profile, *error_status(failure), failure.code)
        return session

    async def GetDecisionReceipt(self, request, context):
        profile = await self._served(context, "decision_receipt")
        session = await self._readable(request, context, profile, managers=False)
        try:
            text = self.t.engine.receipts.receipt(session)
        except ReceiptUnavailable as exc:
            await abort(context, profile, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "RECEIPT_UNAVAILABLE")
        return core_pb2.GetDecisionReceiptResponse(receipt_json=text)

    async def GetReceiptKeys(self, request, context):
        """No credential needed (current.md §14.5)."""
        await self._served(context, "decision_receipt")
        return core_pb2.GetReceiptKeysResponse(jwks_json=self.t.engine.receipts.jwks_json())

    async def WhatIfReplay(self, request, context):
        t = self.t
        profile = await self._served(context, "what_if_replay")
        session = await self._readable(request, context, profile, managers=True)
        if not request.HasField("candidate"):
            await abort(context, profile, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST: candidate required",
                        "INVALID_REQUEST")
        try:   # a replay is CPU work: off the loop whatever the store
            return await t.offload.always(what_if, t.engine, session, request.candidate)
        except WhatIfError as exc:
            await abort(context, profile, _STATUS_OF_CODE[exc.code], exc.message, exc.code)
        except StatusError as exc:
            await abort_status_error(context, profile, exc)
        except MacpError as exc:
            log.error("WhatIfReplay of session %s failed: %s", request.session_id, exc)
            await abort(context, profile, *error_status(exc), exc.code)
