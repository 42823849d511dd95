"""Decision receipts and WhatIfReplay with several instances over one PostgreSQL database: every
instance signs with the one key set kept in the shared document store, so a receipt fetched from any
instance — before and after all of them restart — is the same bytes and verifies with the SDK; a key
rotated through the database reaches the running instances; a what-if replay from another instance
sees the whole history.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from macp.v1 import policy_pb2
from macp_sdk import AuthConfig, MacpClient
from macp_sdk.receipt import trusted_keys_from_jwks, verify_receipt

from tests.support import ROOT, ServerProcess
from tests.wire.test_receipts_wire import ATTESTED, FLOWS

pytestmark = pytest.mark.usefixtures("postgres_server")


def pg_env(url: str) -> dict:
    return {"MACP_PROTOCOL_PROFILE": "current", "MACP_STORAGE_BACKEND": "postgres", "MACP_DATABASE_URL": url, "MACP_DATABASE_POOL_SIZE": "4",
            "MACP_WORKERS": "16", "MACP_MAX_STREAMS": "50"}


def client(srv) -> MacpClient:
    return MacpClient(target=srv.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("coordinator"),
                      default_timeout=10)


def fetch(srv, sid, reader):
    with client(srv) as c:
        result = c.get_decision_receipt(sid, auth=AuthConfig.for_dev_agent(reader))
        keys = trusted_keys_from_jwks(c.get_receipt_keys())
    assert verify_receipt(result.receipt, keys) == ATTESTED
    return result.raw, keys


def test_receipts_from_every_instance_before_and_after_restart(pg_url, tmp_path):
    servers = [ServerProcess(str(tmp_path / f"inst{i}"), pg_env(pg_url)).start(wait=False) for i in range(2)]
    try:
        for srv in servers:
            srv.wait_ready()
        first, second = servers
        with client(first) as c:
            sessions = [flow(c) for flow in FLOWS]          # every session is made on the first instance
        raws = {}
        for sid, _mode, reader in sessions:
            raws[sid], keys = fetch(first, sid, reader)
            raw2, keys2 = fetch(second, sid, reader)       # ...and receipted by the second, identically
            assert raw2 == raws[sid] and keys2 == keys
        assert len(keys) == 1
        assert not os.path.exists(os.path.join(first.data_dir, "receipt-keys.json"))   # the key set is in the database

        # a what-if replay from the second instance sees the first instance's whole history
        sid, _mode, reader = sessions[0]
        candidate = policy_pb2.PolicyDescriptor(policy_id="policy.strict", mode="macp.mode.decision.v1",
                                                rules=json.dumps({"voting": {"algorithm": "majority",
                                                                             "quorum": {"type": "count", "value": 3}},
                                                                  "commitment": {"require_vote_quorum": True}}),
                                                schema_version=1)
        with client(second) as c:
            response = c.what_if_replay(sid, candidate, auth=AuthConfig.for_dev_agent(reader))
        assert len(response.entries) == 6 and response.first_divergence == 5
        assert response.denials[0].message_id == response.entries[5].message_id

        for srv in servers:
            srv.restart()
        for sid, _mode, reader in sessions:
            for srv in servers:
                assert fetch(srv, sid, reader)[0] == raws[sid]

        # rotation through the database: both running instances switch; the old key stays published
        out = subprocess.run([sys.executable, "-m", "macp_runtime", "receipts", "rotate-key", "--database-url", pg_url],
                             capture_output=True, text=True, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MACP_")})
        assert out.returncode == 0, out.stderr
        sid, _mode, reader = sessions[1]
        deadline = time.monotonic() + 10
        while True:
            raw_a, keys_a = fetch(first, sid, reader)
            raw_b, keys_b = fetch(second, sid, reader)
            if len(keys_a) == len(keys_b) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(keys_a) == len(keys_b) == 2 and raw_a == raw_b and raw_a != raws[sid]
        assert verify_receipt(json.loads(raws[sid]), keys_a) == ATTESTED   # older receipts still verify
    finally:
        for srv in servers:
            srv.kill()
