#!/usr/bin/env python3
"""Watch the mode registry change while extensions come and go (WatchModeRegistry).

A watcher thread prints every `RegistryChanged` notice. Meanwhile the admin (dev-mode identities may
manage the registry):

1. registers `ext.checklist_<run>.v1` with a full YAML mode spec carried in the descriptor under
   `schema_uris["macp-runtime/spec-yaml"]` — the runtime compiles it, so the extension is enforced by
   its phases and senders, not merely passed through;
2. runs one session of it: an out-of-phase `Done` is refused, the initiator's `Item`s are accepted,
   a participant's `Done` moves it on, and the initiator's Commitment resolves it;
3. registers a passthrough extension (a descriptor only), lists the extensions, and unregisters both.

    scripts/serve                                     # in one terminal
    .venv/bin/python examples/registry_watcher.py     # in another

Every registry answer is printed as `[label] ok=<bool> error='<text>'` and every Ack as
`[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`. Exit status 0 when each answer is the
expected one and the watcher saw one notice on subscribing plus one per change (last line
`RESOLVED session=<id>`).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from macp.v1 import core_pb2, envelope_pb2  # noqa: E402

from _client import OPEN, RESOLVED, Client, StepFailed, main  # noqa: E402
from _lines import install  # noqa: E402

RUN = uuid.uuid4().hex[:8]
MODE = f"ext.checklist_{RUN}.v1"
PASSTHROUGH = f"ext.notes_{RUN}.v1"
SPEC_KEY = "macp-runtime/spec-yaml"

SPEC = """\
spec_version: 1
mode: ext.checklist.v1            # the registered name replaces this
version: 1.0.0
strict_start: true
descriptor:
  title: Checklist
  description: The initiator lists items; a participant marks the list done; the initiator commits.
  message_types: [SessionStart, Item, Done, Commitment]
  terminal_message_types: [Commitment]
payloads:
  Item: json
  Done: json
  Commitment: macp.v1.CommitmentPayload
state:
  initial: generic.message_log
phases:
  initial: Listing
  names: [Listing, Checked, Committed]
unlisted_messages:
  senders: []
transitions:
  - message: Item
    from: [Listing]
    to: Listing
    senders: [initiator]
    guards:
      - check: {hook: generic.has_fields, fields: [text]}
        reject: InvalidPayload
        why: an item needs a text
    effects: [generic.record]
  - message: Done
    from: [Listing]
    to: Checked
    senders: [participant]
    guards:
      - check: {hook: generic.any_sent, message: Item}
        reject: InvalidPayload
        why: nothing to check yet
    effects: [generic.record]
commitment:
  message: Commitment
  from: [Checked]
  to: Committed
  senders: [initiator]
  guards:
    - check: common.commitment_matches_session
      reject: InvalidPayload
      why: the Commitment must carry the session's versions
"""


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def scenario(client: Client) -> None:
    stub, admin = client.stub, client.credentials("admin")
    notices: list = []
    got_notice = threading.Condition()

    call = stub.WatchModeRegistry(core_pb2.WatchModeRegistryRequest(), metadata=admin)   # watches need a credential

    def watch():
        try:
            for response in call:
                with got_notice:
                    notices.append(response.change)
                    got_notice.notify_all()
                print(f"[watch] registry={response.change.registry} observed_at={response.change.observed_at_unix_ms}")
        except Exception:  # cancelled at the end
            pass

    def wait_for(n: int) -> None:
        with got_notice:
            if not got_notice.wait_for(lambda: len(notices) >= n, timeout=client.timeout):
                raise StepFailed(f"the watcher saw {len(notices)} notices, expected {n}")

    def registry(label: str, response, expect_ok: bool = True):
        print(f"[{label}] ok={str(response.ok).lower()} error='{response.error}'")
        if response.ok != expect_ok:
            raise StepFailed(f"{label}: expected ok={expect_ok}")

    watcher = threading.Thread(target=watch, name="watcher", daemon=True)
    watcher.start()
    wait_for(1)                                   # the notice sent on subscribing

    descriptor = core_pb2.ModeDescriptor(
        mode=MODE, mode_version="1.0.0", title="Checklist",
        message_types=["SessionStart", "Item", "Done", "Commitment"], terminal_message_types=["Commitment"],
        schema_uris={SPEC_KEY: SPEC})
    registry("register spec", stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=descriptor),
                                                   metadata=admin))
    wait_for(2)
    registry("register again", stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=descriptor),
                                                    metadata=admin), expect_ok=False)

    client.mode = MODE
    client.start("lead", ["ana"], "release checklist")
    # Refused by the compiled machine: Done needs an item first; only the initiator lists items.
    _send_expecting(client, "done too early", "ana", "Done", js({}), "INVALID_ENVELOPE")
    client.send("item 1", "lead", "Item", js({"text": "tag the release"}))
    client.send("item 2", "lead", "Item", js({"text": "publish notes"}))
    _send_expecting(client, "item from ana", "ana", "Item", js({"text": "mine"}), "FORBIDDEN")
    client.send("done", "ana", "Done", js({}), OPEN)
    client.commit("lead", "checklist.completed", "release", "all items done")
    client.get_session("ana", RESOLVED)

    notes = core_pb2.ModeDescriptor(mode=PASSTHROUGH, mode_version="1.0.0", title="Notes",
                                    message_types=["SessionStart", "Note", "Commitment"],
                                    terminal_message_types=["Commitment"])
    registry("register passthrough", stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=notes),
                                                          metadata=admin))
    wait_for(3)
    names = [m.mode for m in stub.ListExtModes(core_pb2.ListExtModesRequest()).modes]
    print(f"[list ext modes] {', '.join(names)}")
    for name in (PASSTHROUGH, MODE):
        registry(f"unregister {name}", stub.UnregisterExtMode(core_pb2.UnregisterExtModeRequest(mode=name),
                                                              metadata=admin))
    wait_for(5)
    time.sleep(0.2)
    call.cancel()
    if len(notices) != 5:
        raise StepFailed(f"the watcher saw {len(notices)} notices, expected 5")
    print(f"[watch] {len(notices)} notices: one on subscribing, one per successful change")


def _send_expecting(client: Client, label: str, sender: str, message_type: str, payload: bytes, code: str):
    env = envelope_pb2.Envelope(macp_version="1.0", mode=client.mode, message_type=message_type,
                                message_id=str(uuid.uuid4()), session_id=client.session_id, sender=sender,
                                timestamp_unix_ms=int(time.time() * 1000), payload=payload)
    ack = client.stub.Send(core_pb2.SendRequest(envelope=env), metadata=client.credentials(sender),
                           timeout=client.timeout).ack
    print(f"[{label}] ok={str(ack.ok).lower()} duplicate={str(ack.duplicate).lower()} "
          f"state={ack.session_state} error='{ack.error.code}'")
    if ack.ok or ack.error.code != code:
        raise StepFailed(f"{label}: expected error '{code}', got ok={ack.ok} error='{ack.error.code}'")
    return ack


if __name__ == "__main__":
    install()
    sys.exit(main(__doc__, MODE, scenario))
