"""Authentication and authorisation over the wire: JWT bearer, static tokens, dev mode, capability flags.

Spec: runtime.md §4.2 (credential extraction), §4.3 (resolver chain, JWT rules, JWKS parsing),
§4.4 (static token configuration), §4.5 (where each capability is enforced), §11 (start-up aborts).
Tokens are minted here with PyJWT against keys generated for the test; JWKS are served inline or by a
local HTTP server on 127.0.0.1.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import threading
import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from macp.modes.decision.v1 import decision_pb2
from macp.modes.task.v1 import task_pb2
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from tests.support import ServerProcess, envelope, free_port, new_session_id, start_payload
from tests.support.inprocess import InProcessServer
from macp_runtime.kernel import auth

DECISION = "macp.mode.decision.v1"
TASK = "macp.mode.task.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
ISSUER = "https://issuer.macp.test"


# --- keys, JWKS and tokens ---------------------------------------------------------------------------

def _b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Keys:
    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_outsider = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.hmac = os.urandom(32)


KEYS = Keys()


def rsa_jwk(private, kid="r") -> dict:
    nums = private.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "n": _b64url(nums.n), "e": _b64url(nums.e)}


def ec_jwk(private, kid="e") -> dict:
    nums = private.public_key().public_numbers()
    return {"kty": "EC", "kid": kid, "crv": "P-256", "x": _b64url(nums.x), "y": _b64url(nums.y)}


def oct_jwk(secret: bytes, kid="h") -> dict:
    return {"kty": "oct", "kid": kid, "k": base64.b64encode(secret).decode()}


def jwks(*keys) -> str:
    return json.dumps({"keys": list(keys)})


def mint(sub="alice", alg="RS256", key=None, headers=None, omit=(), **claims) -> str:
    now = int(time.time())
    body = {"sub": sub, "iss": ISSUER, "aud": "macp-runtime", "exp": now + 600, "iat": now}
    body.update(claims)
    for name in omit:
        body.pop(name, None)
    if key is None:
        key = {"RS256": KEYS.rsa, "ES256": KEYS.ec, "HS256": KEYS.hmac}[alg]
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_raw(secret: bytes, sub="alice") -> str:
    """An HS256 token built by hand (PyJWT refuses to sign with key-shaped secrets)."""
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(json.dumps({"sub": sub, "iss": ISSUER, "aud": "macp-runtime",
                            "exp": int(time.time()) + 600}).encode())
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(sig)}"


def bearer(token: str):
    return [("authorization", f"Bearer {token}")]


# --- servers -----------------------------------------------------------------------------------------

STATIC_TOKENS = [
    {"token": "tok-coord", "sender": "coord"},
    {"token": "tok-alice", "sender": "alice"},
    {"token": "tok-bob", "sender": "bob"},
    {"token": "tok-outsider", "sender": "outsider"},
    {"token": "tok-nostart", "sender": "nostart", "can_start_sessions": False},
    {"token": "tok-decider", "sender": "decider", "allowed_modes": [DECISION]},
    {"token": "tok-allmodes", "sender": "allmodes", "allowed_modes": []},
    {"token": "tok-capped", "sender": "capped", "max_open_sessions": 1},
    {"token": "tok-watcher", "sender": "watcher", "is_observer": True},
    {"token": "tok-admin", "sender": "admin", "can_manage_mode_registry": True},
    {"token": "tok.dotted", "sender": "dotted"},
    {"token": "tok-dup", "sender": "first"},
    {"token": "tok-dup", "sender": "second", "unknown_key": 1},
]


def _server(tmp_path_factory, env: dict) -> InProcessServer:
    return InProcessServer(str(tmp_path_factory.mktemp("auth") / "data"), env).start()


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory):
    """JWT (inline JWKS with two RSA keys, an EC key and an HMAC key) followed by static tokens."""
    srv = _server(tmp_path_factory, {
        "MACP_AUTH_ISSUER": ISSUER,
        "MACP_AUTH_JWKS_JSON": jwks(rsa_jwk(KEYS.rsa, "r1"), rsa_jwk(KEYS.rsa2, "r2"), ec_jwk(KEYS.ec),
                                    oct_jwk(KEYS.hmac), {"kty": "OKP", "x": "skipped"}),
        "MACP_AUTH_TOKENS_JSON": json.dumps(STATIC_TOKENS),
    })
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def jstub(jwt_server):
    return jwt_server.stub()


@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
    """Static tokens only, read from a file in the {"tokens": [...]} form."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps({"tokens": STATIC_TOKENS}))
    srv = _server(tmp_path_factory, {"MACP_AUTH_TOKENS_FILE": str(path)})
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def sstub(static_server):
    return static_server.stub()


# --- small wire helpers ------------------------------------------------------------------------------

def send(stub, env, metadata):
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=list(metadata)).ack


def start_env(mode=DECISION, sender="", participants=("alice", "bob"), session_id=None):
    return envelope(mode, "SessionStart", session_id or new_session_id(), sender, start_payload(participants))


def start(stub, metadata, mode=DECISION, participants=("alice", "bob")) -> str:
    env = start_env(mode, participants=participants)
    ack = send(stub, env, metadata)
    assert ack.ok and ack.session_state == OPEN, ack
    return env.session_id


def proposal(session_id, proposal_id="p1"):
    return envelope(DECISION, "Proposal", session_id, "",
                    decision_pb2.ProposalPayload(proposal_id=proposal_id, option="opt"))


def signal():
    return envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="ping"))


def assert_code(ack, code):
    assert not ack.ok and ack.error.code == code, ack


def get_session(stub, sid, metadata):
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=list(metadata)).metadata


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def whoami(stub, metadata) -> str | None:
    """The sender the server derives for these credentials (None when UNAUTHENTICATED)."""
    env = start_env()
    ack = send(stub, env, metadata)
    if not ack.ok:
        assert ack.error.code == "UNAUTHENTICATED", ack
        return None
    return get_session(stub, env.session_id, metadata).initiator


# --- JWT bearer (§4.3 item 1) ------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_jwt_algorithms_each_authenticate_as_sub(jstub, alg):
    token = mint(sub=f"agent-{alg.lower()}", alg=alg)
    assert whoami(jstub, bearer(token)) == f"agent-{alg.lower()}"


def test_jwt_kid_selects_the_key(jstub):
    # issue 12 point 10: signed with the second RSA key, kid naming the first one -> refused (was accepted)
    assert whoami(jstub, bearer(mint(sub="second-key", key=KEYS.rsa2, headers={"kid": "r1"}))) is None
    assert whoami(jstub, bearer(mint(sub="second-key", key=KEYS.rsa2, headers={"kid": "r2"}))) == "second-key"
    # a kid no key declares is refused; no kid at all: every key of the algorithm is tried
    assert whoami(jstub, bearer(mint(sub="second-key", key=KEYS.rsa2, headers={"kid": "nobody"}))) is None
    assert whoami(jstub, bearer(mint(sub="second-key", key=KEYS.rsa2))) == "second-key"


def test_jwt_hand_built_hs256_is_accepted(jstub):
    # the same construction as the algorithm-confusion case below, with the real secret
    assert whoami(jstub, bearer(_hs256_raw(KEYS.hmac, sub="handmade"))) == "handmade"


def test_jwt_sender_must_match_sub(jstub):
    token = mint(sub="alice")
    env = start_env(sender="mallory")
    assert_code(send(jstub, env, bearer(token)), "UNAUTHENTICATED")
    env = start_env(sender="alice")
    assert send(jstub, env, bearer(token)).ok


@pytest.mark.parametrize("token_factory", [
    lambda: mint(exp=int(time.time()) - 120),                               # expired beyond the leeway
    lambda: mint(omit=("exp",)),                                            # exp is required
    lambda: mint(iss="https://someone-else.test"),                          # wrong issuer
    lambda: mint(omit=("iss",)),                                            # issuer is required
    lambda: mint(aud="another-audience"),                                   # wrong audience
    lambda: mint(aud=["x", "y"]),                                           # audience list without ours
    lambda: mint(omit=("aud",)),                                            # audience is required
    lambda: mint(key=KEYS.rsa_outsider),                                    # bad signature
    lambda: mint(alg="ES256", key=ec.generate_private_key(ec.SECP256R1())),  # bad signature, EC
    lambda: mint(alg="HS256", key=b"not-the-secret-not-the-secret-32"),     # bad signature, HMAC
    lambda: mint(alg="RS512", key=KEYS.rsa),                                # algorithm not accepted
    lambda: mint(alg="HS384", key=KEYS.hmac * 2),                           # algorithm not accepted
    lambda: mint(alg="none", key=""),                                      # alg none
    lambda: mint(omit=("sub",)),                                            # sub is required
    lambda: mint(sub=""),                                                   # sub must not be empty
    lambda: mint(sub="   "),                                                # nor blank
    lambda: mint(nbf=int(time.time()) + 3600),                              # not valid yet
    lambda: mint(sub=12345),                                                # sub must be a string
    lambda: _hs256_raw(KEYS.rsa.public_key().public_bytes(                # RSA public key as HMAC secret
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
    lambda: mint(macp_scopes=["not", "an", "object"]),                      # malformed scopes
    lambda: mint(macp_scopes={"allowed_modes": "macp.mode.decision.v1"}),   # allowed_modes not a list
    lambda: "not.a.jwt",                                                    # a dot, but no JWT
    lambda: mint() + "x",                                                   # tampered signature
], ids=["expired", "no-exp", "wrong-iss", "no-iss", "wrong-aud", "aud-list-without-ours", "no-aud",
        "bad-signature-rsa", "bad-signature-ec", "bad-signature-hmac", "alg-rs512", "alg-hs384", "alg-none",
        "no-sub", "empty-sub", "blank-sub", "nbf-future", "sub-not-string", "alg-confusion", "scopes-not-object", "scopes-bad-modes", "garbage",
        "tampered"])
def test_jwt_rejections(jstub, token_factory):
    token = token_factory()
    assert whoami(jstub, bearer(token)) is None
    err = rpc_error(jstub.GetSession, core_pb2.GetSessionRequest(session_id=new_session_id()),
                    metadata=bearer(token))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def _mint_none() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"sub": "alice", "iss": ISSUER, "aud": "macp-runtime",
                                                "exp": int(time.time()) + 600}).encode()).rstrip(b"=").decode()
    return f"{header}.{body}."


def test_jwt_alg_none_is_rejected(jstub):
    assert whoami(jstub, bearer(_mint_none())) is None


def test_jwt_leeway_nbf_iat_and_audience_list(jstub):
    now = int(time.time())
    assert whoami(jstub, bearer(mint(sub="late", exp=now - 20))) == "late"              # within 60 s leeway
    assert whoami(jstub, bearer(mint(sub="early", nbf=now + 30))) == "early"           # nbf: same leeway
    assert whoami(jstub, bearer(mint(sub="too-early", nbf=now + 3600))) is None        # nbf honoured
    assert whoami(jstub, bearer(mint(sub="iat", iat=now + 3600))) == "iat"             # iat not checked
    assert whoami(jstub, bearer(mint(sub="multi", aud=["other", "macp-runtime"]))) == "multi"


def test_jwt_is_read_from_authorization_only(jstub):
    token = mint(sub="alice")
    assert whoami(jstub, [("x-macp-token", token)]) is None
    # authorization wins when both are usable
    assert whoami(jstub, [("x-macp-token", "tok-bob"), ("authorization", f"Bearer {token}")]) == "alice"


def test_chain_static_tokens_follow_jwt_and_invalid_jwts_do_not_fall_through(jstub):
    assert whoami(jstub, bearer("tok-coord")) == "coord"
    assert whoami(jstub, [("x-macp-token", "tok-bob")]) == "bob"
    assert whoami(jstub, bearer("tok-unknown")) is None       # static owns dot-free tokens: unknown = reject
    assert whoami(jstub, bearer("coord")) is None             # no dev mode once anything is configured
    assert whoami(jstub, bearer("tok.dotted")) is None        # dotted token belongs to the JWT resolver


def test_jwt_repeated_use_is_served_consistently(jstub):
    token = mint(sub="repeat", alg="ES256")
    for _ in range(5):
        assert whoami(jstub, bearer(token)) == "repeat"


# --- JWT capability flags (macp_scopes) ----------------------------------------------------------------

def test_jwt_scopes_default_flags(jstub):
    token = mint(sub="plainjwt")
    sid = start(jstub, bearer(token), mode=TASK, participants=("plainjwt", "w"))
    assert send(jstub, signal(), bearer(token)).ok                # all modes, including ""
    err = rpc_error(jstub.GetSession, core_pb2.GetSessionRequest(session_id=start(jstub, bearer("tok-coord"))),
                    metadata=bearer(token))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED        # not an observer
    assert get_session(jstub, sid, bearer(token)).initiator == "plainjwt"


def test_jwt_scopes_empty_allowed_modes_allows_no_mode(jstub):
    token = mint(sub="nomodes", macp_scopes={"allowed_modes": []})
    assert_code(send(jstub, start_env(), bearer(token)), "FORBIDDEN")
    assert_code(send(jstub, signal(), bearer(token)), "FORBIDDEN")


def test_jwt_scopes_allowed_modes(jstub):
    token = mint(sub="decidejwt", macp_scopes={"allowed_modes": [DECISION]})
    start(jstub, bearer(token))
    assert_code(send(jstub, start_env(TASK), bearer(token)), "FORBIDDEN")
    assert_code(send(jstub, signal(), bearer(token)), "FORBIDDEN")      # Signals carry mode ""
    token = mint(sub="signaljwt", macp_scopes={"allowed_modes": [""]})
    assert send(jstub, signal(), bearer(token)).ok


def test_jwt_scopes_flags(jstub):
    nostart = mint(sub="alice", macp_scopes={"can_start_sessions": False})
    assert_code(send(jstub, start_env(), bearer(nostart)), "FORBIDDEN")
    sid = start(jstub, bearer("tok-coord"))
    assert send(jstub, proposal(sid), bearer(nostart)).ok               # other messages still allowed

    capped = mint(sub="cappedjwt", macp_scopes={"max_open_sessions": 1})
    first = start(jstub, bearer(capped))
    assert_code(send(jstub, start_env(), bearer(capped)), "RATE_LIMITED")
    jstub.CancelSession(core_pb2.CancelSessionRequest(session_id=first), metadata=bearer(capped))
    start(jstub, bearer(capped))

    observer = mint(sub="auditor", macp_scopes={"is_observer": True})
    assert get_session(jstub, sid, bearer(observer)).session_id == sid


# --- static tokens (§4.4) ------------------------------------------------------------------------------

def test_static_tokens_from_file_in_tokens_object_form(sstub):
    assert whoami(sstub, bearer("tok-alice")) == "alice"
    assert whoami(sstub, [("x-macp-token", "tok-alice")]) == "alice"
    assert whoami(sstub, [("authorization", "Basic tok-alice"), ("x-macp-token", "tok-bob")]) == "bob"


@pytest.mark.parametrize("metadata", [
    [], bearer("tok-unknown"), bearer("alice"), bearer("tok.dotted"), [("x-macp-token", "tok.dotted")],
    [("authorization", "bearer tok-alice")], bearer(""), [("x-macp-agent-id", "alice")],
], ids=["none", "unknown", "dev-style", "dotted", "dotted-x-macp-token", "lowercase-bearer", "empty",
        "agent-id"])
def test_static_tokens_reject(sstub, metadata):
    assert whoami(sstub, metadata) is None
    err = rpc_error(sstub.GetSession, core_pb2.GetSessionRequest(session_id=new_session_id()), metadata=metadata)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def test_static_duplicate_token_last_entry_wins(sstub):
    assert whoami(sstub, bearer("tok-dup")) == "second"


def test_static_can_start_sessions_false(sstub):
    assert_code(send(sstub, start_env(), bearer("tok-nostart")), "FORBIDDEN")
    sid = start(sstub, bearer("tok-coord"), participants=("nostart", "bob"))
    assert send(sstub, proposal(sid), bearer("tok-nostart")).ok


def test_static_allowed_modes(sstub):
    start(sstub, bearer("tok-decider"))
    assert_code(send(sstub, start_env(TASK), bearer("tok-decider")), "FORBIDDEN")
    assert_code(send(sstub, signal(), bearer("tok-decider")), "FORBIDDEN")
    # an empty list in a static entry means every mode
    start(sstub, bearer("tok-allmodes"), mode=TASK, participants=("allmodes", "bob"))
    assert send(sstub, signal(), bearer("tok-allmodes")).ok


def test_static_allowed_modes_are_not_checked_on_get_or_cancel(sstub):
    sid = start(sstub, bearer("tok-coord"), mode=TASK, participants=("coord", "decider"))
    assert get_session(sstub, sid, bearer("tok-decider")).mode == TASK


def test_static_max_open_sessions(sstub):
    first = start(sstub, bearer("tok-capped"))
    ack = send(sstub, start_env(), bearer("tok-capped"))
    assert_code(ack, "RATE_LIMITED")
    assert ack.error.message == "RateLimited"
    # someone else's sessions do not count against the cap
    start(sstub, bearer("tok-coord"), participants=("capped", "bob"))
    ack = sstub.CancelSession(core_pb2.CancelSessionRequest(session_id=first), metadata=bearer("tok-capped")).ack
    assert ack.ok and ack.session_state == CANCELLED
    start(sstub, bearer("tok-capped"))


def test_static_observer_reads_any_session_but_cannot_act(sstub):
    sid = start(sstub, bearer("tok-coord"))
    meta = get_session(sstub, sid, bearer("tok-watcher"))
    assert (meta.session_id, meta.initiator) == (sid, "coord")
    assert_code(send(sstub, proposal(sid), bearer("tok-watcher")), "FORBIDDEN")
    err = rpc_error(sstub.CancelSession, core_pb2.CancelSessionRequest(session_id=sid), metadata=bearer("tok-watcher"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # a non-observer outsider cannot even read it
    err = rpc_error(sstub.GetSession, core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("tok-outsider"))
    assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied")
    assert get_session(sstub, sid, bearer("tok-coord")).state == OPEN


def _register_policy(stub, metadata, policy_id):
    descriptor = policy_pb2.PolicyDescriptor(policy_id=policy_id, mode="*", description="auth test",
                                             rules="{}", schema_version=1)
    return stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor), metadata=metadata)


@pytest.mark.parametrize("who", ["static", "jwt"])
def test_registry_management_needs_the_capability(jstub, who):
    denied = bearer("tok-coord") if who == "static" else bearer(mint(sub="jwt-plain"))
    allowed = bearer("tok-admin") if who == "static" else \
        bearer(mint(sub="jwt-admin", macp_scopes={"can_manage_mode_registry": True}))
    err = rpc_error(_register_policy, jstub, denied, f"policy.auth.{who}.denied")
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
        pytest.skip("RegisterPolicy is not implemented yet")
    assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
    assert _register_policy(jstub, allowed, f"policy.auth.{who}.{uuid.uuid4().hex[:8]}").ok
    err = rpc_error(_register_policy, jstub, bearer("tok-nope"), "policy.auth.x")
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def test_dev_mode_may_manage_the_registry(runtime_server):
    stub = runtime_server.stub()
    try:
        resp = _register_policy(stub, bearer("anyone"), f"policy.dev.{uuid.uuid4().hex[:8]}")
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("RegisterPolicy is not implemented yet")
        raise
    assert resp.ok


# --- JWKS from a URL: lazy fetch, TTL cache, refetch, no stale fallback ----------------------------------

class JwksHttp:
    """A tiny JWKS endpoint on 127.0.0.1 whose body and status the test controls."""

    def __init__(self):
        self.body = jwks(rsa_jwk(KEYS.rsa))
        self.status = 200
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                data = outer.body.encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_jwks_url_fetched_lazily_cached_and_refetched(server_factory):
    http_jwks = JwksHttp()
    try:
        ttl = 2
        srv = server_factory(env={"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_URL": http_jwks.url,
                                  "MACP_AUTH_JWKS_TTL_SECS": str(ttl)})
        stub = srv.stub()
        assert http_jwks.fetches == 0                               # nothing fetched at start-up
        assert whoami(stub, bearer("no-dot-token")) is None         # not a JWT: no fetch either
        assert http_jwks.fetches == 0
        first = mint(sub="url-one")
        assert whoami(stub, bearer(first)) == "url-one"
        assert http_jwks.fetches == 1
        assert whoami(stub, bearer(mint(sub="url-two"))) == "url-two"
        assert http_jwks.fetches == 1                               # within the TTL: cached

        # the issuer rotates to the EC key: after the TTL the old RSA token is refused, the new one works
        http_jwks.body = jwks(ec_jwk(KEYS.ec))
        time.sleep(ttl + 0.5)
        assert whoami(stub, bearer(first)) is None
        assert http_jwks.fetches == 2
        assert whoami(stub, bearer(mint(sub="url-ec", alg="ES256"))) == "url-ec"

        # the endpoint fails: after the TTL requests are refused, no stale keys
        ec_token = mint(sub="url-ec", alg="ES256")
        http_jwks.status, http_jwks.body = 500, "oops"
        time.sleep(ttl + 0.5)
        assert whoami(stub, bearer(ec_token)) is None
        fetches = http_jwks.fetches
        assert whoami(stub, bearer(ec_token)) is None
        assert http_jwks.fetches == fetches                         # the failure is cached (back-off)
        # it recovers: once the back-off has passed the next request refetches and succeeds
        http_jwks.status, http_jwks.body = 200, jwks(ec_jwk(KEYS.ec))
        time.sleep(1.2)
        assert whoami(stub, bearer(ec_token)) == "url-ec"
        assert "JWT bearer" in srv.log()
    finally:
        http_jwks.close()


def test_jwks_url_unreachable_rejects_jwts(inprocess_factory):
    srv = inprocess_factory(env={"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_URL": "http://127.0.0.1:9/none",
                                 "MACP_AUTH_TOKENS_JSON": json.dumps([{"token": "t1", "sender": "static-one"}])})
    stub = srv.stub()
    assert whoami(stub, bearer(mint())) is None
    assert whoami(stub, bearer("t1")) == "static-one"


# --- configuration: which chain, start-up aborts (§4.3 consequences, §4.4, §11) ---------------------------

def test_static_tokens_json_list_and_json_wins_over_file(server_factory, tmp_path):
    srv = server_factory(env={"MACP_AUTH_TOKENS_JSON": json.dumps([{"token": "inline-tok", "sender": "inl"}]),
                              "MACP_AUTH_TOKENS_FILE": str(tmp_path / "does-not-exist.json")})
    stub = srv.stub()
    assert whoami(stub, bearer("inline-tok")) == "inl"
    assert whoami(stub, bearer("inl")) is None
    assert "static bearer tokens (1 from MACP_AUTH_TOKENS_JSON)" in srv.log()


@pytest.mark.parametrize("env", [
    {"MACP_AUTH_TOKENS_JSON": "[{\"token\": \"a\", \"sender\": "},
    {"MACP_AUTH_TOKENS_JSON": "{\"not_tokens\": []}"},
    {"MACP_AUTH_TOKENS_JSON": "[{\"token\": \"a\"}]"},
    {"MACP_AUTH_TOKENS_JSON": "[{\"token\": \"a\", \"sender\": \"b\", \"can_start_sessions\": \"no\"}]"},
    {"MACP_AUTH_TOKENS_FILE": "/nonexistent/macp-tokens.json"},
], ids=["truncated-json", "object-without-tokens", "entry-without-sender", "flag-not-bool", "unreadable-file"])
def test_bad_token_configuration_aborts_startup(server_factory, env):
    srv = server_factory(env=env, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    log_text = srv.log()
    assert "start-up failed: auth configuration" in log_text
    assert "MACP_AUTH_TOKENS" in log_text
    assert "serving" not in log_text


def test_secrets_never_reach_the_log(server_factory):
    secret = "tok-very-secret-value"
    srv = server_factory(env={"MACP_AUTH_TOKENS_JSON": json.dumps([{"token": secret, "sender": "s"}]),
                              "MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_JSON": jwks(oct_jwk(KEYS.hmac))})
    assert whoami(srv.stub(), bearer(secret)) == "s"
    assert whoami(srv.stub(), bearer("wrong-" + secret)) is None
    srv.stop()
    log_text = srv.log()
    assert secret not in log_text
    assert base64.b64encode(KEYS.hmac).decode() not in log_text
    assert "JWT bearer" in log_text and "static bearer tokens" in log_text


@pytest.mark.parametrize("env,named", [
    ({"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_JSON": "{not json"}, "MACP_AUTH_JWKS_JSON"),
    ({"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_JSON": json.dumps({"nokeys": []})}, "MACP_AUTH_JWKS_JSON"),
    ({"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_JSON": jwks({"kty": "RSA", "n": "", "e": ""})},
     "MACP_AUTH_JWKS_JSON"),
    ({"MACP_AUTH_ISSUER": ISSUER}, "MACP_AUTH_ISSUER"),
    ({"MACP_AUTH_TOKENS_JSON": "[]"}, "MACP_AUTH_TOKENS_JSON"),
    ({"MACP_AUTH_TOKENS_JSON": json.dumps({"tokens": []})}, "MACP_AUTH_TOKENS_JSON"),
    ({"MACP_AUTH_JWKS_JSON": jwks(oct_jwk(b"k" * 32))}, "MACP_AUTH_JWKS_JSON"),
    ({"MACP_AUTH_AUDIENCE": "macp-runtime"}, "MACP_AUTH_AUDIENCE"),
    ({"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_URL": "not a url"}, "MACP_AUTH_JWKS_URL"),
    ({"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_URL": "http://127.0.0.1:9/j",
      "MACP_AUTH_JWKS_TTL_SECS": "soon"}, "MACP_AUTH_JWKS_TTL_SECS"),
], ids=["malformed-jwks", "jwks-without-keys", "jwks-no-usable-key", "issuer-without-jwks", "empty-token-list",
        "empty-tokens-object", "jwks-without-issuer", "audience-alone", "jwks-url-not-a-url", "ttl-not-a-number"])
def test_unusable_auth_configuration_fails_closed(server_factory, env, named):
    # issue 12 point 9: these used to start in dev mode (anyone could act as anyone); now exit 1 naming the variable
    srv = server_factory(env=env, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    log_text = srv.log()
    assert "start-up failed: auth configuration" in log_text and named in log_text, log_text
    assert "serving Macp" not in log_text and "serving macp" not in log_text and "auth: dev mode" not in log_text


def test_dev_mode_refuses_a_non_loopback_bind_unless_allowed(server_factory):
    port = free_port()
    srv = server_factory(env={"MACP_BIND_ADDR": f"0.0.0.0:{port}"}, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "MACP_DEV_MODE_ALLOW_REMOTE" in srv.log() and "serving" not in srv.log()
    port = free_port()
    srv = server_factory(env={"MACP_BIND_ADDR": f"0.0.0.0:{port}", "MACP_DEV_MODE_ALLOW_REMOTE": "1"}, start=False)
    srv.target = f"127.0.0.1:{port}"
    srv.start()
    assert whoami(srv.stub(), bearer("devname")) == "devname"


class HangingJwks:
    """A JWKS endpoint that accepts connections and answers only after `delay` seconds."""

    def __init__(self, delay: float):
        outer = self
        self.fetches = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                time.sleep(delay)
                data = jwks(rsa_jwk(KEYS.rsa)).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_hanging_jwks_endpoint_stalls_nobody(server_factory):
    """issue 12 point 7: junk bearers never fetch, one fetch runs at a time and is bounded, others fail fast,
    static-token callers never wait (before: four junk tokens delayed a static caller 4.5 s)."""
    hanging = HangingJwks(delay=30)
    try:
        srv = server_factory(env={"MACP_AUTH_ISSUER": ISSUER, "MACP_AUTH_JWKS_URL": hanging.url,
                                  "MACP_AUTH_TOKENS_JSON": json.dumps([{"token": "t1", "sender": "static-one"}])})
        stub = srv.stub()
        for junk in ("a.b", "x.y.z", "not.a.jwt", "e30.e30.sig"):
            assert whoami(stub, bearer(junk)) is None
        assert hanging.fetches == 0                  # the shape is checked before any fetch
        results = {}

        def jwt_caller(i):
            t0 = time.monotonic()
            results[i] = (whoami(stub, bearer(mint(sub=f"j{i}"))), time.monotonic() - t0)

        callers = [threading.Thread(target=jwt_caller, args=(i,)) for i in range(4)]
        for t in callers:
            t.start()
            time.sleep(0.05)
        t0 = time.monotonic()
        assert whoami(stub, bearer("t1")) == "static-one"
        assert time.monotonic() - t0 < 1.0           # a static-token caller does not wait on the JWKS
        for t in callers:
            t.join(30)
        assert all(who is None for who, _ in results.values())
        assert max(took for _, took in results.values()) < 6.0    # the fetch is bounded (3 s)
        assert sorted(took for _, took in results.values())[-2] < 1.0   # the others failed fast
        assert hanging.fetches == 1
        t0 = time.monotonic()
        assert whoami(stub, bearer(mint(sub="later"))) is None     # the failure is cached: no new fetch yet
        assert time.monotonic() - t0 < 1.0 and hanging.fetches == 1
    finally:
        hanging.close()


# --- in-process checks of the parsing rules ---------------------------------------------------------------

def test_jwks_parsing_rules():
    k = b"secret-key-material"
    keys = auth.parse_jwks(jwks(
        {"kty": "oct", "k": base64.b64encode(k).decode()},          # standard padded base64
        {"kty": "oct", "k": "not base64!"},                          # raw UTF-8 bytes of the string
        {"kty": "oct", "k": base64.urlsafe_b64encode(b"\xfb\xff-").rstrip(b"=").decode()},  # not std -> raw
        {"kty": "RSA", "n": "", "e": "AQAB"},                        # unusable: skipped
        {"kty": "EC", "x": "AA", "y": "AA"},                         # not on the curve: skipped
        {"kty": "OKP", "x": "AA"},                                   # unsupported: skipped
        ec_jwk(KEYS.ec) | {"crv": "P-384"},                          # crv ignored
    ))
    assert [key for _, key in keys["HS256"][:2]] == [k, b"not base64!"]
    assert keys["HS256"][2][1] == base64.urlsafe_b64encode(b"\xfb\xff-").rstrip(b"=")
    assert len(keys["ES256"]) == 1 and keys["RS256"] == []
    assert [kid for kid, _ in keys["ES256"]] == ["e"]
    with pytest.raises(ValueError):
        auth.parse_jwks(jwks({"kty": "RSA", "n": "", "e": ""}))
    with pytest.raises(ValueError):
        auth.parse_jwks("[]")


def test_static_token_entry_defaults():
    table = auth.parse_tokens(json.dumps([{"token": "t", "sender": "s"},
                                          {"token": "u", "sender": "v", "allowed_modes": ["m"],
                                           "max_open_sessions": None, "is_observer": True}]), "test")
    assert table["t"] == auth.Identity(sender="s")
    assert table["u"] == auth.Identity(sender="v", allowed_modes=frozenset({"m"}), is_observer=True)
    dev = auth.DevAuthenticator().authenticate(bearer("x"))
    assert dev == auth.Identity(sender="x", can_manage_mode_registry=True)
