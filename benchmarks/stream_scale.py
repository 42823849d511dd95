"""Ten thousand passive subscribers on one instance (issue 14): hold them, send through them, check them.

Starts the server (the project, or the bare aio echo baseline with `--server echo`), opens
`--sessions` Decision sessions whose participants are `coordinator` plus `--per-session` agents,
then opens one passive StreamSession per agent (subscribe_session_id, request side left open) from
`--procs` asyncio client processes, each opening its share in batches of `--batch` (a burst of
thousands of stream starts in one client process fails inside grpc core). Once every subscriber
has its replayed SessionStart, the coordinator sends `--proposals` Proposals into every session
(sessions in parallel, up to `--inflight` Sends at a time, each session's in order), and every
subscriber checks that it got each one exactly once and in order.

Reports: streams held, server RSS before and after opening them (so memory per idle stream),
deliveries/s (all deliveries / time from the first Send to the last delivery), send -> delivery
latency p50/p99, and how many subscribers got every envelope in order.

    .venv/bin/python benchmarks/stream_scale.py                                  # 50 x 200, 20 Proposals
    .venv/bin/python benchmarks/stream_scale.py --sessions 1000 --per-session 10
    .venv/bin/python benchmarks/stream_scale.py --server echo                     # the ceiling
    .venv/bin/python benchmarks/stream_scale.py --target 127.0.0.1:50051 --server-pid 1234   # a running server

Not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = os.path.join(os.path.dirname(ROOT), "shared", "bench", "echo_server.py")
MODE = "macp.mode.decision.v1"
COORD = "coordinator"
STREAMS_PER_CHANNEL = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_server(kind: str, streams: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    env.update({"MACP_ALLOW_INSECURE": "1", "MACP_BIND_ADDR": target, "MACP_MEMORY_ONLY": "1",
                "MACP_SESSION_START_LIMIT_PER_MINUTE": "1000000000",
                "MACP_MESSAGE_LIMIT_PER_MINUTE": "1000000000", "MACP_LOG_LEVEL": "warning"})
    log = tempfile.NamedTemporaryFile(prefix=f"stream-scale-{kind}-", suffix=".log", delete=False)
    if kind == "echo":
        cmd = [sys.executable, ECHO, "--aio", "--stream"]
    else:
        cmd = [sys.executable, "-m", "macp_runtime", "serve"]
        if streams > 10_000:   # the default holds 10,000; more needs the cap raised
            env["MACP_MAX_STREAMS"] = str(streams + 100)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    import grpc

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: see {log.name}")
        try:
            with grpc.insecure_channel(target) as ch:
                grpc.channel_ready_future(ch).result(timeout=0.3)
            return proc, target, log.name
        except grpc.FutureTimeoutError:
            continue
    raise SystemExit(f"server did not start: see {log.name}")


def _md(who: str):
    return (("authorization", f"Bearer {who}"),)


# --- subscriber processes ----------------------------------------------------------------------

def subscriber_main(index: int, target: str, plan: list[tuple[str, str]], proposals: int, batch: int,
                    ready, go, results) -> None:
    """Holds the passive subscribers `plan` ([(session id, identity)]) on one channel."""
    asyncio.run(_subscribers(index, target, plan, proposals, batch, ready, go, results))


async def _subscribers(index, target, plan, proposals, batch, ready, go, results):
    import grpc
    from macp.v1 import core_pb2, core_pb2_grpc

    # at most STREAMS_PER_CHANNEL streams per connection (servers may cap concurrent streams per
    # connection, e.g. the echo baseline at 1,000)
    n_channels = max(1, -(-len(plan) // STREAMS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_channels)]
    stubs = [core_pb2_grpc.MACPRuntimeServiceStub(ch) for ch in channels]
    gate = asyncio.Semaphore(batch)
    outcomes: list = [None] * len(plan)
    held = 0

    async def one(slot: int, sid: str, who: str) -> None:
        nonlocal held
        recv = array("q", [0] * proposals)
        in_order, status, got = True, "ok", 0
        async with gate:   # at most `batch` stream starts in flight
            call = stubs[slot % len(stubs)].StreamSession(metadata=_md(who))
            try:
                await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid, after_sequence=0))
                first = await call.read()
                if first is grpc.aio.EOF or first.envelope.message_type != "SessionStart":
                    status = "no replayed SessionStart"
            except grpc.RpcError as exc:
                status = f"subscribe failed {exc.code().name}: {exc.details()}"
        if status != "ok":
            outcomes[slot] = (sid, status, False, 0, recv.tobytes())
            ready.release()
            return
        held += 1
        ready.release()
        try:
            while got < proposals:
                resp = await call.read()
                now = time.monotonic_ns()
                if resp is grpc.aio.EOF:
                    status = "stream ended early"
                    break
                if resp.HasField("error"):
                    status = f"inline error {resp.error.code}"
                    in_order = False
                    continue
                k = int(resp.envelope.message_id.rsplit("-", 1)[1])
                if k != got + 1:
                    in_order = False
                if 1 <= k <= proposals:
                    recv[k - 1] = now
                got += 1
        except grpc.RpcError as exc:
            status = f"stream ended {exc.code().name}: {exc.details()}"
        call.cancel()
        outcomes[slot] = (sid, status, in_order and got == proposals, got, recv.tobytes())

    tasks = [asyncio.ensure_future(one(i, sid, who)) for i, (sid, who) in enumerate(plan)]
    await asyncio.gather(*tasks)
    results.put({"worker": index, "held": held, "outcomes": outcomes})
    for channel in channels:
        await channel.close()


# --- the sender ----------------------------------------------------------------------------------

async def create_sessions(target: str, sessions: int, per_session: int) -> list[tuple[str, list[str]]]:
    import grpc
    from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

    out = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        for s in range(sessions):
            sid = str(uuid.uuid4())
            agents = [f"agent-{s}-{i}" for i in range(per_session)]
            start = core_pb2.SessionStartPayload(
                intent="stream scale", participants=[COORD, *agents], mode_version="1.0.0",
                configuration_version="config.default", policy_version="policy.default", ttl_ms=3_600_000)
            env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type="SessionStart",
                                        message_id=f"{sid}-0", session_id=sid, sender=COORD,
                                        timestamp_unix_ms=int(time.time() * 1000),
                                        payload=start.SerializeToString())
            ack = (await stub.Send(core_pb2.SendRequest(envelope=env), metadata=_md(COORD))).ack
            if not ack.ok:
                raise SystemExit(f"SessionStart refused: {ack.error.code}")
            out.append((sid, agents))
    return out


async def send_all(target: str, sids: list[str], proposals: int, inflight: int) -> tuple[dict, int, list]:
    import grpc
    from macp.modes.decision.v1 import decision_pb2
    from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

    sent: dict[str, array] = {sid: array("q", [0] * proposals) for sid in sids}
    errors: list[str] = []
    gate = asyncio.Semaphore(inflight)
    payloads = [decision_pb2.ProposalPayload(proposal_id=f"p{k}", option=f"option {k}",
                                             rationale="stream scale").SerializeToString()
                for k in range(1, proposals + 1)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)

        async def session(sid: str) -> None:
            for k in range(1, proposals + 1):
                env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type="Proposal",
                                            message_id=f"{sid}-{k}", session_id=sid, sender=COORD,
                                            timestamp_unix_ms=int(time.time() * 1000), payload=payloads[k - 1])
                async with gate:
                    sent[sid][k - 1] = time.monotonic_ns()
                    ack = (await stub.Send(core_pb2.SendRequest(envelope=env), metadata=_md(COORD))).ack
                if not ack.ok and len(errors) < 5:
                    errors.append(f"{sid} p{k}: {ack.error.code}")

        t0 = time.monotonic_ns()
        await asyncio.gather(*(session(sid) for sid in sids))
    return sent, t0, errors


def percentile(values: list[int], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("project", "echo"), default="project")
    ap.add_argument("--target", help="a running server instead of starting one (then give --server-pid)")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--per-session", type=int, default=200, help="passive subscribers (participants) per session")
    ap.add_argument("--proposals", type=int, default=20, help="Proposals sent into every session")
    ap.add_argument("--procs", type=int, default=4, help="subscriber processes")
    ap.add_argument("--batch", type=int, default=100, help="stream starts in flight per process")
    ap.add_argument("--inflight", type=int, default=16, help="Sends in flight")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    streams = args.sessions * args.per_session
    proc = None
    if args.target:
        target, pid, log = args.target, args.server_pid, None
    else:
        proc, target, log = start_server(args.server, streams)
        pid = proc.pid
    try:
        sessions = asyncio.run(create_sessions(target, args.sessions, args.per_session))
        time.sleep(0.5)
        rss_before = rss_bytes(pid) if pid else 0
        plan = [(sid, who) for sid, agents in sessions for who in agents]
        ctx = mp.get_context("spawn")
        ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=subscriber_main, daemon=True,
                             args=(w, target, plan[w::args.procs], args.proposals, args.batch, ready, go, results))
                 for w in range(args.procs)]
        t_open = time.monotonic()
        for p in procs:
            p.start()
        for _ in range(streams):
            if not ready.acquire(timeout=args.timeout):
                raise SystemExit("subscribers did not open in time")
        open_s = time.monotonic() - t_open
        time.sleep(1.0)
        rss_held = rss_bytes(pid) if pid else 0
        sent, t0, errors = asyncio.run(send_all(target, [sid for sid, _ in sessions], args.proposals, args.inflight))
        send_s = (time.monotonic_ns() - t0) / 1e9
        got = [results.get(timeout=args.timeout) for _ in procs]
        rss_after = rss_bytes(pid) if pid else 0
        for p in procs:
            p.join(timeout=10)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    held = sum(r["held"] for r in got)
    latencies, last, deliveries, complete, problems = [], 0, 0, 0, []
    for r in got:
        for sid, status, ok, count, raw in r["outcomes"]:
            recv = array("q")
            recv.frombytes(raw)
            deliveries += count
            complete += ok
            if status != "ok" and len(problems) < 5:
                problems.append(status)
            for k, t in enumerate(recv):
                if t:
                    latencies.append(t - sent[sid][k])
                    last = max(last, t)
    span = (last - t0) / 1e9 if last else 0
    result = {
        "server": args.server if not args.target else "external", "sessions": args.sessions,
        "per_session": args.per_session, "streams": streams, "held": held, "complete_in_order": complete,
        "proposals": args.proposals, "sends": args.sessions * args.proposals, "send_errors": errors,
        "open_s": round(open_s, 1), "send_s": round(send_s, 2),
        "deliveries": deliveries, "deliveries_per_s": round(deliveries / span, 1) if span else 0,
        "delivery_ms_p50": round(percentile(latencies, 50) / 1e6, 1),
        "delivery_ms_p99": round(percentile(latencies, 99) / 1e6, 1),
        "rss_mib_before": round(rss_before / 2**20, 1), "rss_mib_held": round(rss_held / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
        "bytes_per_idle_stream": round((rss_held - rss_before) / held) if held else None,
        "problems": problems, "server_log": log,
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1)
    ok = held == streams and complete == streams and not errors
    print(("OK" if ok else "!!! FAILED") + f": {held}/{streams} streams held, {complete}/{streams} complete "
          f"and in order, {result['deliveries_per_s']} deliveries/s, p99 {result['delivery_ms_p99']} ms, "
          f"RSS {result['rss_mib_held']} MiB held ({result['bytes_per_idle_stream']} B per idle stream)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
