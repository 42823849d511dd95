#!/usr/bin/env python3
"""Mutation fuzzing of a running server over the wire (issue 12): envelopes and registry requests,
valid ones mutated field by field and byte by byte, plus raw garbage, on every unary RPC.

Starts its own server (dev-mode auth on a free loopback port, durable data directory in a temporary
folder, rate limits lifted so the judging paths are reached), then sends --requests requests from
--procs client processes (asyncio, --concurrency calls in flight each) and reports:

* every gRPC status seen, with counts; UNKNOWN and INTERNAL answers with their distinct details
  (there must be none);
* whether the server crashed or stopped answering;
* the server's RSS every --sample seconds, sessions and modes in memory at the end.

  python benchmarks/fuzz.py --requests 1000000
  python benchmarks/fuzz.py --requests 20000 --procs 1          # a quick look

Session ids come from a pool of --sessions ids and registered mode names from a pool of 64, so the
server's state stays the size a real deployment with that many sessions and modes would have: what
the RSS curve then shows is what the *requests* leave behind, not the legitimate data they create.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = "/macp.v1.MACPRuntimeService/"
MODES = ["macp.mode.decision.v1", "macp.mode.proposal.v1", "macp.mode.task.v1", "macp.mode.handoff.v1",
         "macp.mode.quorum.v1", "ext.multi_round.v1"]
SENDERS = ["alice", "bob", "carol", "", "mallory", "x" * 300]
MESSAGE_TYPES = ["Proposal", "Evaluation", "Objection", "Vote", "Commitment", "Signal", "Progress", "TaskRequest",
                 "HandoffOffer", "ApprovalRequest", "Contribute", "SessionStart", "Bogus"]
SPEC = """\
spec_version: 1
mode: MODE
version: 1.0.0
descriptor:
  title: Fuzz
  message_types: [SessionStart, Note, Commitment]
payloads: {Note: json, Commitment: macp.v1.CommitmentPayload}
state: {initial: generic.message_log}
phases: {initial: Open, names: [Open, Done]}
transitions:
  - message: Note
    from: [Open]
    to: [{phase: Open, when: {hook: generic.any_sent, message: Note}}, {phase: Open}]
    senders: [participant]
    guards: [{check: {hook: generic.has_fields, fields: [text]}, why: needs text}]
    effects: [generic.record]
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator],
             ready: {hook: generic.count_at_least, message: Note, count: 1}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- request generation -------------------------------------------------------------------------------

def _weird_string(rng: random.Random) -> str:
    return rng.choice([
        "", " ", "\n", "a" * rng.choice([1, 255, 257, 5000]), "\x00\x1b[2J", "macp.mode.x", "💥" * 10,
        str(uuid.uuid4()), "A" * 22, "../../etc/passwd", "\ud7ff", "%s%n", "null",
    ])


def _weird_int(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 86_400_001, int(time.time() * 1000),
                       int(time.time() * 1000) + 10**12])


class Gen:
    def __init__(self, seed: int, sessions: int):
        from macp.modes.decision.v1 import decision_pb2
        from macp.v1 import core_pb2, envelope_pb2, policy_pb2
        self.core, self.env_pb, self.policy, self.decision = core_pb2, envelope_pb2, policy_pb2, decision_pb2
        self.rng = random.Random(seed)
        self.sessions = [str(uuid.UUID(int=random.Random(i).getrandbits(128), version=4)) for i in range(sessions)]
        self.mode_names = [f"ext.fuzz{i}.v1" for i in range(64)]

    def payload(self, mtype: str) -> bytes:
        rng, core, d = self.rng, self.core, self.decision
        if mtype == "SessionStart":
            p = core.SessionStartPayload(intent="fuzz", participants=rng.sample(SENDERS[:3] + ["dave"], rng.randint(0, 4)),
                                         mode_version="1.0.0", configuration_version="c", policy_version="",
                                         ttl_ms=rng.choice([60_000, 1, 0, 86_400_000, 86_400_001]))
        elif mtype == "Proposal":
            p = d.ProposalPayload(proposal_id=rng.choice(["p1", "p2", ""]), option="o")
        elif mtype == "Vote":
            p = d.VotePayload(proposal_id="p1", vote=rng.choice(["APPROVE", "REJECT", "nah"]))
        elif mtype == "Commitment":
            p = core.CommitmentPayload(commitment_id="c", action="a", authority_scope="s", reason="r",
                                       mode_version="1.0.0", configuration_version="c", outcome_positive=True)
        elif mtype == "Signal":
            p = core.SignalPayload(signal_type=rng.choice(["ping", " "]),
                                   correlation_session_id=rng.choice(["", rng.choice(self.sessions)]))
        elif mtype == "Progress":
            p = core.ProgressPayload(progress=rng.random(), total=1)
        else:
            return json.dumps({"text": "t"}).encode() if rng.random() < 0.5 else os.urandom(rng.randint(0, 64))
        return p.SerializeToString()

    def envelope(self):
        rng = self.rng
        mtype = rng.choice(MESSAGE_TYPES)
        mode = rng.choice(MODES + self.mode_names[:4])
        env = self.env_pb.Envelope(macp_version="1.0", mode=mode, message_type=mtype, message_id=str(uuid.uuid4()),
                                   session_id=rng.choice(self.sessions), sender="",
                                   timestamp_unix_ms=int(time.time() * 1000), payload=self.payload(mtype))
        if mtype == "Signal":
            env.mode, env.session_id = "", ""
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):   # structured mutations
            field = rng.choice(["macp_version", "mode", "message_type", "message_id", "session_id", "sender",
                                "timestamp_unix_ms", "payload"])
            if field == "timestamp_unix_ms":
                env.timestamp_unix_ms = _weird_int(rng)
            elif field == "payload":
                env.payload = self._mutate_bytes(env.payload)
            else:
                setattr(env, field, _weird_string(rng))
        return env

    def _mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1 and data:
                del data[rng.randrange(len(data)):]
            elif op == 2:
                pos = rng.randrange(len(data) + 1)
                data[pos:pos] = os.urandom(rng.randint(1, 16))
            elif op == 3 and data:
                pos = rng.randrange(len(data))
                data[pos:pos] = data[pos:pos + rng.randint(1, 32)] * rng.randint(1, 8)
            else:
                data += bytes([rng.choice([0x08, 0x10, 0x1a, 0x22, 0xff]), rng.randrange(256)])
        return bytes(data)

    def spec_text(self, name: str) -> str:
        rng = self.rng
        text = SPEC.replace("MODE", name)
        lines = text.splitlines()
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            i = rng.randrange(len(lines))
            op = rng.randrange(7)
            if op == 0:
                lines[i] = lines[i].replace(":", ": &a" if "&a" not in text else ":", 1)
            elif op == 1:
                lines.insert(i, "x: " + "[" * rng.randint(1, 200) + "]" * rng.randint(0, 200))
            elif op == 2:
                lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
            elif op == 3:
                lines[i] = lines[i].replace("Note", rng.choice(["phase", "trigger", "state", "to", "Note"]))
            elif op == 4:
                lines.insert(i, "? [a, b]\n: c")
            elif op == 5:
                lines[i] = lines[i].replace("generic.", rng.choice(["generic.is_blank", "generic._x", "os.", "generic."]))
            else:
                lines.insert(i, "bomb: &b [" + ", ".join(["*a"] * 9) + "]" if "&a" in "\n".join(lines) else "k: v")
        return "\n".join(lines)

    def request(self) -> tuple[str, bytes]:
        """(method, serialized request)."""
        rng, core, pol = self.rng, self.core, self.policy
        r = rng.random()
        if r < 0.62:
            method, msg = "Send", core.SendRequest(envelope=self.envelope())
        elif r < 0.70:
            name = rng.choice(self.mode_names)
            if rng.random() < 0.5:
                desc = core.ModeDescriptor(mode=name, mode_version="1.0.0",
                                           message_types=["SessionStart", "Note", "Commitment"],
                                           schema_uris={"macp-runtime/spec-yaml": self.spec_text(name)})
            else:
                desc = core.ModeDescriptor(mode=name, mode_version=rng.choice(["1", ""]),
                                           message_types=[rng.choice(MESSAGE_TYPES) for _ in range(rng.randint(0, 20))])
            method, msg = "RegisterExtMode", core.RegisterExtModeRequest(mode_descriptor=desc)
        elif r < 0.73:
            method, msg = rng.choice([("UnregisterExtMode", core.UnregisterExtModeRequest(mode=rng.choice(self.mode_names))),
                                      ("PromoteMode", core.PromoteModeRequest(mode=rng.choice(self.mode_names),
                                                                             promoted_mode_name=rng.choice(["", "macp.mode.z.v1", _weird_string(rng)])))])
        elif r < 0.77:
            rules = rng.choice(['{"voting":{"threshold":0.6}}', "{", "[]", '{"voting":{"threshold":"x"}}', "{}" * 1000])
            method, msg = "RegisterPolicy", pol.RegisterPolicyRequest(policy_descriptor=pol.PolicyDescriptor(
                policy_id=rng.choice(["p.a", "p.b", _weird_string(rng)]), mode=rng.choice(MODES + ["*"]),
                rules=rules, schema_version=rng.choice([0, 1, 2, 99])))
        elif r < 0.93:
            sid = rng.choice(self.sessions + [_weird_string(rng)])
            method, msg = rng.choice([
                ("GetSession", core.GetSessionRequest(session_id=sid)),
                ("CancelSession", core.CancelSessionRequest(session_id=sid, reason=_weird_string(rng))),
                ("SuspendSession", core.SuspendSessionRequest(session_id=sid, reason="r")),
                ("ResumeSession", core.ResumeSessionRequest(session_id=sid, reason="r")),
                ("ListSessions", core.ListSessionsRequest(page_size=rng.choice([0, 1, 5, -1, 10**6]),
                                                          page_token=rng.choice(["", "!!", "MTox"]))),
                ("Initialize", core.InitializeRequest(supported_protocol_versions=rng.choice([["1.0"], [], ["9"]]))),
                ("GetPolicy", pol.GetPolicyRequest(policy_id=rng.choice(["p.a", "policy.default"]))),
                ("ListExtModes", core.ListExtModesRequest()),
            ])
        else:
            method = rng.choice(["Send", "GetSession", "RegisterExtMode", "RegisterPolicy", "ListSessions",
                                 "CancelSession", "PromoteMode", "Initialize"])
            return method, os.urandom(rng.randint(0, 96))
        data = msg.SerializeToString()
        if rng.random() < 0.3:
            data = self._mutate_bytes(data)
        return method, data

    def metadata(self):
        rng = self.rng
        who = rng.random()
        if who < 0.1:
            return ()
        if who < 0.15:
            return (("authorization", "Bearer " + rng.choice(["a.b.c", "e30.e30.", "x" * 300, ""])),)
        name = rng.choice(["alice", "bob", "carol", "admin"]) if who < 0.9 else f"agent-{rng.randrange(100_000)}"
        return (("authorization", f"Bearer {name}"),)


# --- client processes -----------------------------------------------------------------------------------

async def _client(target: str, count: int, seed: int, concurrency: int, sessions: int, out) -> None:
    import grpc
    gen = Gen(seed, sessions)
    codes: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        calls = {}
        sem = asyncio.Semaphore(concurrency)

        async def one(method: str, data: bytes, metadata) -> None:
            call = calls.get(method)
            if call is None:
                call = calls[method] = channel.unary_unary(SERVICE + method)
            try:
                await call(data, metadata=metadata, timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                    bad[f"{method}: {exc.code().name}: {(exc.details() or '')[:160]}"] += 1
            finally:
                sem.release()

        tasks = set()
        for _ in range(count):
            await sem.acquire()
            method, data = gen.request()
            task = asyncio.ensure_future(one(method, data, gen.metadata()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.sleep(0.05)
    out.put((dict(codes), dict(bad)))


def _client_proc(target, count, seed, concurrency, sessions, out):
    asyncio.run(_client(target, count, seed, concurrency, sessions, out))


# --- the run ----------------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def gauge(metrics_url: str, name: str) -> float | None:
    try:
        body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=2000, help="size of the session id pool")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--memory-only", action="store_true", help="serve from memory instead of a durable log")
    args = ap.parse_args()

    data_dir = tempfile.mkdtemp(prefix="macp-fuzz-")
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    env.update({"MACP_ALLOW_INSECURE": "1", "MACP_BIND_ADDR": f"127.0.0.1:{port}", "MACP_DATA_DIR": data_dir,
                "MACP_SESSION_START_LIMIT_PER_MINUTE": "100000000", "MACP_MESSAGE_LIMIT_PER_MINUTE": "100000000",
                "MACP_METRICS_ADDR": f"127.0.0.1:{metrics_port}", "MACP_LOG_LEVEL": "warning"})
    if args.memory_only:
        env["MACP_MEMORY_ONLY"] = "1"
    log = open(os.path.join(data_dir, "server.log"), "wb")
    server = subprocess.Popen([sys.executable, "-m", "macp_runtime", "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    target = f"127.0.0.1:{port}"
    import grpc
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
    print(f"server pid {server.pid} on {target}, data in {data_dir}", flush=True)

    out = multiprocessing.Queue()
    per = args.requests // args.procs
    procs = [multiprocessing.Process(target=_client_proc,
                                     args=(target, per, args.seed + i, args.concurrency, args.sessions, out))
             for i in range(args.procs)]
    t0 = time.monotonic()
    samples = [(0.0, rss_mib(server.pid))]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=args.sample))
        except Exception:
            pass
        now = time.monotonic() - t0
        if now - samples[-1][0] >= args.sample:
            samples.append((now, rss_mib(server.pid)))
            print(f"  t={now:7.1f}s  server RSS {samples[-1][1]:7.1f} MiB  alive={server.poll() is None}", flush=True)
    for p in procs:
        p.join()
    elapsed = time.monotonic() - t0
    samples.append((elapsed, rss_mib(server.pid)))
    alive = server.poll() is None
    codes: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    for c, b in results:
        codes.update(c)
        bad.update(b)
    total = sum(codes.values())
    in_memory = gauge(metrics_url, "macp_sessions_in_memory")
    print(f"\n{total} requests in {elapsed:.0f} s ({total / elapsed:.0f}/s) from {args.procs} processes")
    for code, n in codes.most_common():
        print(f"  {code:<20} {n:>9}  {100 * n / total:6.2f} %")
    print(f"UNKNOWN: {codes.get('UNKNOWN', 0)}   INTERNAL: {codes.get('INTERNAL', 0)}   "
          f"distinct causes: {len(bad)}")
    for cause, n in bad.most_common(40):
        print(f"  {n:>7}  {cause}")
    print(f"server crashed: {not alive}")
    print("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s={r:.0f}" for t, r in samples))
    print(f"sessions in memory at the end: {in_memory}")
    if alive:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if alive and not codes.get("UNKNOWN") and not codes.get("INTERNAL") else 1


if __name__ == "__main__":
    sys.exit(main())
