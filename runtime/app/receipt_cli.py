"""Operator commands for decision receipts and what-if replays.

    macp-runtime sessions receipt ID [--json] [--out FILE]     a resolved session's receipt, verified
    macp-runtime policies what-if SESSION POLICY [--json]      SESSION re-judged under POLICY
    macp-runtime receipts verify FILE [--keys JWKS] [--json]   offline verification of a saved receipt
    macp-runtime receipts rotate-key [--data-dir DIR | --database-url URL]

POLICY is a registered policy id, or `@FILE` with a descriptor as JSON ({"policy_id", "mode",
"description", "rules", "schema_version"}; `rules` may be an object or its JSON text), which is
checked like a registration but never registered.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from macp.v1 import core_pb2, policy_pb2

from ..kernel.receipts import verify_file_text
from . import options
from .client import auth_metadata, command, connect, fail, table
from .config import Config

_VERDICT_EXIT = {"attested": 0}


def register(sub, sessions_sub, policies_sub) -> None:
    p = command(sessions_sub, "receipt", "a resolved session's decision receipt, verified against the server's keys",
                "macp-runtime sessions receipt 0b6e…-… --token alice --out receipt.json", sessions_receipt,
                session=True)
    p.add_argument("--out", metavar="FILE", help="also save the receipt exactly as served (for `receipts verify`)")
    p = command(policies_sub, "what-if", "re-judge a session's recorded history under another policy "
                "(nothing changes on the server)",
                "macp-runtime policies what-if 0b6e…-… policy.std.unanimous --token alice", policies_what_if,
                session=True)
    p.add_argument("policy", help="a registered policy id, or @FILE holding a policy descriptor as JSON")

    receipts = sub.add_parser("receipts", help="verify saved decision receipts; rotate the receipt signing key",
                              description="Decision receipts without a server: verify a saved receipt, or rotate "
                                          "the signing key kept with the data.")
    rsub = receipts.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = rsub.add_parser("verify", help="verify a saved receipt offline (integrity, and signatures against --keys)",
                        description="Verify a saved macp-receipt/1 receipt without a server: the commitment "
                                    "hash and wire bytes (integrity), and each attestation against the keys in "
                                    "--keys (a JWK Set as GetReceiptKeys returns it). Exit status 0 only when "
                                    "the verdict is `attested`.",
                        epilog="example:\n  macp-runtime receipts verify receipt.json --keys keys.json\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the receipt (JSON), e.g. saved by `sessions receipt --out`")
    p.add_argument("--keys", metavar="JWKS", help="trusted keys: a JWK Set file (e.g. `sessions receipt --json` "
                                                  "output's `keys`, or GetReceiptKeys' jwks_json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=receipts_verify)
    p = rsub.add_parser("rotate-key", help="generate a new receipt signing key; old public keys stay published",
                        description="Generate a new Ed25519 receipt signing key in the key set of a data "
                                    "directory (file backend) or of a PostgreSQL database. Receipts are signed "
                                    "with it from the next receipt request on (running servers notice the "
                                    "change); every earlier public key stays published, so older receipts "
                                    "still verify. Has no effect on a configured key "
                                    "(MACP_RECEIPT_SIGNING_KEY / _FILE) other than keeping it published.",
                        epilog="examples:\n  macp-runtime receipts rotate-key --data-dir .macp-data\n"
                               "  macp-runtime receipts rotate-key --database-url postgresql://macp@127.0.0.1/macp\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_flags(p, Config, only=("data_dir", "database_url", "storage_backend"))
    p.set_defaults(func=receipts_rotate_key)


# --- sessions receipt ------------------------------------------------------------------------------

def sessions_receipt(args) -> int:
    channel, stub = connect(args)
    try:
        raw = stub.GetDecisionReceipt(core_pb2.GetDecisionReceiptRequest(session_id=args.session_id),
                                      metadata=auth_metadata(args), timeout=30).receipt_json
        jwks_text = stub.GetReceiptKeys(core_pb2.GetReceiptKeysRequest(), timeout=30).jwks_json
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(raw)
    receipt = json.loads(raw)
    jwks = json.loads(jwks_text)
    result = verify_file_text(raw, jwks_text)
    if args.json:
        print(json.dumps({"receipt": receipt, "receipt_json": raw, "keys": jwks, "verification": result},
                         indent=2, ensure_ascii=False))
        return _VERDICT_EXIT.get(result["verdict"], 1)
    c = receipt["commitment"]
    kids = []
    for att in receipt.get("attestations", []):
        try:
            header = json.loads(_b64url(att["jws"].split(".")[0]))
            kids.append(header.get("kid", "?"))
        except Exception:
            kids.append("?")
    print(f"session      {receipt['session_id']}\nmode         {receipt['mode']}\n"
          f"commitment   {c['commitment_id']}  {c['action']}  (outcome_positive={str(c['outcome_positive']).lower()})\n"
          f"scope        {c['authority_scope']}\nreason       {c['reason']}\n"
          f"versions     mode {c['mode_version']}, policy {c['policy_version']}, "
          f"configuration {c['configuration_version']}\n"
          f"hash         {receipt['commitment_hash']}\nissuer       {receipt['issuer']}\n"
          f"issued at    {receipt['issued_at']}\n"
          f"semantics    {receipt.get('semantics_rev', {}).get('implementation', '-')} "
          f"rev {receipt.get('semantics_rev', {}).get('rev', '-')}\n"
          f"signed by    {', '.join(kids) or '(unsigned)'}\n"
          f"verdict      {result['verdict']} (integrity {result['integrity']}, "
          f"attestations {', '.join(result['attestations']) or 'none'})")
    if args.out:
        print(f"saved to     {args.out}")
    return _VERDICT_EXIT.get(result["verdict"], 1)


def _b64url(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- policies what-if ------------------------------------------------------------------------------

def _descriptor_from_file(path: str) -> policy_pb2.PolicyDescriptor:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict):
        raise ValueError("the file must hold one JSON object")
    rules = doc.get("rules", "")
    if not isinstance(rules, str):
        rules = json.dumps(rules, separators=(",", ":"), ensure_ascii=False)
    return policy_pb2.PolicyDescriptor(policy_id=str(doc.get("policy_id", "")), mode=str(doc.get("mode", "")),
                                       description=str(doc.get("description", "")), rules=rules,
                                       schema_version=int(doc.get("schema_version", 0)))


def policies_what_if(args) -> int:
    from ..kernel.whatif import describe

    channel, stub = connect(args)
    try:
        if args.policy.startswith("@"):
            try:
                candidate = _descriptor_from_file(args.policy[1:])
            except (OSError, ValueError, TypeError) as exc:
                print(f"error: cannot read the policy descriptor {args.policy[1:]!r}: {exc}", file=sys.stderr)
                return 1
        else:
            candidate = stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id=args.policy), metadata=auth_metadata(args),
                                       timeout=30).policy_descriptor
        response = stub.WhatIfReplay(policy_pb2.WhatIfReplayRequest(session_id=args.session_id, candidate=candidate),
                                     metadata=auth_metadata(args), timeout=60)
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    summary = describe(response)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    rec, cand = summary["recorded"], summary["candidate"]
    print(f"session      {args.session_id}\n"
          f"recorded     {summary['recorded_policy_id']}: {_final(rec)}\n"
          f"candidate    {summary['candidate_policy_id']}: {_final(cand)}\n"
          f"diverges at  {'-' if summary['first_divergence'] is None else summary['first_divergence']}")
    rows = []
    for e in summary["entries"]:
        r, c = e["recorded"], e["candidate"]
        rows.append([e["history_index"], e["message_type"], e["message_id"], _entry(r), _entry(c)])
    print()
    print(table(rows, ["#", "MESSAGE", "MESSAGE ID", "RECORDED POLICY", "CANDIDATE POLICY"]))
    for d in summary["denials"]:
        details = d["details"]
        denials = details.get("denials") if isinstance(details, dict) else None
        if denials:
            for item in denials:
                print(f"denied #{d['history_index']}: [{item.get('code', '?')}] {item.get('message', '')}")
        else:
            reasons = details.get("reasons", []) if isinstance(details, dict) else [str(details)]
            for reason in reasons:
                print(f"denied #{d['history_index']}: {reason}")
    return 0


def _final(o: dict) -> str:
    if o["state"] == "RESOLVED":
        return f"RESOLVED by #{o['resolved_by_history_index']} {o['resolved_by_message_type']}"
    return o["state"]


def _entry(o: dict) -> str:
    text = f"{o['kind']} {o['state']}"
    if o.get("error_code"):
        text += f" {o['error_code']}"
    return text


# --- receipts verify / rotate-key ------------------------------------------------------------------

def receipts_verify(args) -> int:
    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
        jwks_text = None
        if args.keys:
            with open(args.keys, encoding="utf-8") as fh:
                jwks_text = fh.read()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = verify_file_text(text, jwks_text)
    if args.json:
        print(json.dumps({"file": args.file, "verification": result}, indent=2))
    else:
        print(f"{result['verdict']}: integrity {result['integrity']}, "
              f"attestations {', '.join(result['attestations']) or 'none'}")
    return _VERDICT_EXIT.get(result["verdict"], 1)


def receipts_rotate_key(args) -> int:
    from ..kernel.receipt_keys import DocumentKeySet, FileKeySet, rotate
    from ..storage.base import StorageError

    # where `serve` keeps the key set, as its flags and variables say (a given --database-url means postgres)
    cfg, _problems, _warnings = options.read(Config, os.environ, vars(args))   # only these three are used
    postgres = cfg.storage_backend == "postgres" or args.database_url is not None
    try:
        if postgres:
            if not cfg.database_url:
                print("error: the postgres backend needs --database-url (MACP_DATABASE_URL)", file=sys.stderr)
                return 1
            from ..storage import open_store

            store = open_store(False, backend="postgres", database_url=cfg.database_url, pool_size=2)
            store.open()
            try:
                new, old = rotate(DocumentKeySet(store.documents()))
            finally:
                store.close()
        else:
            new, old = rotate(FileKeySet(cfg.data_dir))
    except (StorageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"new receipt signing key {new}" + (f"; {old} stays published" if old else ""))
    return 0

