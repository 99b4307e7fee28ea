#!/usr/bin/python3
"""Throughput of the worker helper alone: no broker, no daemon.

This process plays the daemon: it starts a worker in a child process with the
two protocol pipes, sends the hello and then N events, keeping `concurrency`
of them in flight like the daemon does, and counts the acks. The worker is
what the aio-pika peer does: parse, dispatch by event type to a no-op
`async def` (or a plain function with --sync).

    /usr/bin/python3 clients/python/bench_protocol.py [--events N] [--concurrency C]
                     [--sync] [--baseline | --compare] [--rounds R]

--baseline runs the bare loop instead of the helper: StreamReader.readline,
json.loads, a dict lookup, await the no-op, write an ack line (the issue's
reference figure); --compare interleaves rounds of both and prints both
medians and their ratio. Prints events/s and the worker's CPU time per event.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TYPES = ["speaker.onboarded", "draft.ingested", "rag.dfn_generated", "evaluation.completed"]


def child_helper(sync):
    sys.path.insert(0, HERE)
    from event_router import Worker
    worker = Worker()
    for t in TYPES:
        if sync:
            def handle(event_data):
                pass
        else:
            async def handle(event_data):
                pass
        worker.register_handler(t, handle)
    worker.run()


def child_baseline():
    import asyncio

    async def noop(event_data):
        pass
    handlers = {t: noop for t in TYPES}

    async def main():
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(int(os.environ["ER_WORKER_IN_FD"]), "rb", 0))
        transport, protocol = await loop.connect_write_pipe(
            asyncio.BaseProtocol, os.fdopen(int(os.environ["ER_WORKER_OUT_FD"]), "wb", 0))
        await reader.readline()
        transport.write(b'{"type":"ready","protocol":1}\n')
        while line := await reader.readline():
            msg = json.loads(line)
            await handlers[msg["event_type"]](msg["event"])
            transport.write(b'{"type":"result","id":%d,"verdict":"ack"}\n' % msg["id"])
    asyncio.run(main())


def event_line(i):
    t = TYPES[i % len(TYPES)]
    eid = "5b0c%028x" % i
    event = {"event_id": eid, "event_type": t, "aggregate_id": "d-%d" % i, "aggregate_type": "Draft",
             "correlation_id": "c-%d" % i, "timestamp": "2026-12-01T10:30:00Z", "version": 1,
             "payload": {"speaker_id": "s-%d" % i, "draft_id": "d-%d" % i, "word_count": 120}}
    msg = {"type": "event", "id": i + 1, "event_type": t, "event_id": eid, "aggregate_id": event["aggregate_id"],
           "aggregate_type": "Draft", "correlation_id": event["correlation_id"], "routing_key": t,
           "exchange": "draft-genie.events", "queue": "bench.events", "attempt": 1, "redelivered": False,
           "event": event}
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def one_round(args, lines):
    ev_r, ev_w = os.pipe()
    res_r, res_w = os.pipe()
    mode = "--baseline-child" if args.baseline else ("--sync-child" if args.sync else "--child")
    env = dict(os.environ, ER_WORKER_IN_FD=str(ev_r), ER_WORKER_OUT_FD=str(res_w), ER_WORKER_PROTOCOL="1")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode], env=env,
                             pass_fds=(ev_r, res_w), stdin=subprocess.DEVNULL)
    os.close(ev_r)
    os.close(res_w)
    os.write(ev_w, json.dumps({"type": "hello", "protocol": 1, "handler": "bench", "queue": "bench.events",
                               "concurrency": args.concurrency}).encode() + b"\n")
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(res_r, 65536)
        if not chunk:
            sys.exit("the worker exited before ready")
        buf += chunk
    assert buf.startswith(b'{"type":"ready","protocol":1}'), buf
    buf = buf[buf.index(b"\n") + 1:]
    n = len(lines)
    sent = min(args.concurrency, n)
    start = time.perf_counter()
    os.write(ev_w, b"".join(lines[:sent]))
    answered = acks = 0
    while answered < n:
        chunk = os.read(res_r, 1 << 20)
        if not chunk:
            sys.exit("the worker exited after %d answers" % answered)
        k = chunk.count(b"\n")
        acks += chunk.count(b'"verdict":"ack"')
        answered += k
        if k and sent < n:
            more = min(k, n - sent)
            os.write(ev_w, b"".join(lines[sent:sent + more]))
            sent += more
    elapsed = time.perf_counter() - start
    os.close(ev_w)
    while os.read(res_r, 65536):
        pass
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    os.close(res_r)
    if acks != n or child.returncode != 0:
        sys.exit("expected %d acks and exit 0, got %d acks, exit %s" % (n, acks, child.returncode))
    return n / elapsed, (usage.ru_utime + usage.ru_stime) / n * 1e6


def main():
    if len(sys.argv) == 2 and sys.argv[1] in ("--child", "--sync-child"):
        return child_helper(sys.argv[1] == "--sync-child")
    if len(sys.argv) == 2 and sys.argv[1] == "--baseline-child":
        return child_baseline()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sync", action="store_true", help="plain handler functions (thread pool)")
    ap.add_argument("--baseline", action="store_true", help="the bare asyncio loop instead of the helper")
    ap.add_argument("--compare", action="store_true",
                    help="interleave rounds of the baseline loop and the helper; print both medians")
    args = ap.parse_args()
    lines = [event_line(i) for i in range(args.events)]
    helper = "helper, plain functions" if args.sync else "helper, async def"
    if args.compare:
        modes = [("baseline loop", True), (helper, False)]
    else:
        modes = [("baseline loop" if args.baseline else helper, args.baseline)]
    rates = {what: [] for what, _ in modes}
    for r in range(args.rounds):
        for what, baseline in modes:
            args.baseline = baseline
            rate, cpu_us = one_round(args, lines)
            rates[what].append(rate)
            print("round %d: %s, concurrency %d: %.0f events/s, worker CPU %.1f us/event"
                  % (r + 1, what, args.concurrency, rate, cpu_us), flush=True)
    medians = {what: sorted(v)[len(v) // 2] for what, v in rates.items()}
    for what, m in medians.items():
        print("median: %s: %.0f events/s (%d events, %d rounds, load average %.1f)"
              % (what, m, args.events, args.rounds, os.getloadavg()[0]))
    if args.compare:
        print("helper / baseline: %.2fx" % (medians[helper] / medians["baseline loop"]))


if __name__ == "__main__":
    main()
