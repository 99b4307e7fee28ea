"""Soak: thousands of events with every verdict, across three queues, while
the config is reloaded (SIGHUP every ~1.5 s, alternating two configs that
change handler names, record files, prefetch, concurrency and workers) and the
broker closes the daemon's connection every ~5 s (`rabbitmqctl
close_connection` on the daemon's own connections only: they are found by the
daemon's local TCP ports, so other clients of the shared broker are never
touched).

Queues A and B use handlers/payload_verdict_plugin.c (verdict per attempt from
markers in the payload, one record line per call); queue C an exec handler
(handlers/attempts.py, exit code per attempt). Every queue has dedupe on and
`retry: {max_attempts: 3}`. The kinds of events:

  ack         succeeds at attempt 1
  retry_ack   retry at attempt 1, succeeds at attempt 2
  dead        dead-letter at attempt 1
  exhaust     retry at every attempt: dead-lettered after attempt 3

At the end:
  - every ack/retry_ack event succeeded, and exactly once (dedupe on: the
    success record per event id is exactly one);
  - no dead/exhaust event ever succeeded, no event ran past attempt 3;
  - every dead/exhaust event is in its queue's DLQ (at least once; the
    duplicates there are reported), nothing else is;
  - work and delay queues are empty with nothing unacked;
  - both configs' handlers ran, the connection really was closed, the daemon is
    still running and exits 0 on SIGTERM.

Under the sanitizer build (build-asan/) the harness also fails the test on any
AddressSanitizer/UBSan report in the daemon's log.

Run:   cd tests/integration && /usr/bin/python3 -m unittest -v test_soak
Knobs: ER_SOAK_EVENTS (default 3000), ER_SOAK_RELOAD_S (default 1.5),
       ER_SOAK_CLOSE_S (default 5).
Prints `SOAK-RESULT ...` with the figures (duplicates, closes, reloads, time).
"""
import asyncio
import json
import os
import signal
import sys
import time
import unittest
import uuid
from collections import Counter
from typing import Any, Dict, List, Set

from harness import HERE, RouterTestCase, run_rabbitmqctl
from test_verdicts import build_payload_plugin

ATTEMPTS_HANDLER = os.path.join(HERE, "handlers", "attempts.py")
N_EVENTS = int(os.environ.get("ER_SOAK_EVENTS", "3000"))
RELOAD_EVERY = float(os.environ.get("ER_SOAK_RELOAD_S", "1.5"))
CLOSE_EVERY = float(os.environ.get("ER_SOAK_CLOSE_S", "5"))
MAX_ATTEMPTS = 3
RETRY = {"max_attempts": MAX_ATTEMPTS, "delay": "200ms", "multiplier": 2, "max_delay": "400ms"}
DELAY_STEPS_MS = (200, 400)

# kind -> (plugin markers, exec actions per attempt)
KINDS = {
    "ack": ("", ["0"]),
    "retry_ack": ("V1=retry;V2=ack;", ["75", "0"]),
    "dead": ("V1=dead:soak;", ["65"]),
    "exhaust": ("V1=retry;V2=retry;V3=retry;", ["75"]),
}
SUCCEEDS = ("ack", "retry_ack")


def kind_of(i: int) -> str:
    """55% ack, 20% retry_ack, 15% dead, 10% exhaust, interleaved."""
    r = i % 20
    return "ack" if r < 11 else "retry_ack" if r < 15 else "dead" if r < 18 else "exhaust"


def queue_of(i: int) -> str:
    """A 45%, B 45%, C (exec, slower per event) 10%."""
    r = i % 20
    return "c" if r in (3, 13) else "a" if i % 2 == 0 else "b"


def local_tcp_ports(pid: int) -> Set[int]:
    """Local ports of the TCP sockets process `pid` holds (from /proc)."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


class SoakTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.plugin = await asyncio.to_thread(build_payload_plugin)
        self.queues = {k: self.queue_name(k) for k in ("a", "b", "c")}
        self.config_path = os.path.join(self.tmp, "router.yaml")
        self.plugin_recs = [os.path.join(self.tmp, "plugin-%d.jsonl" % g) for g in (1, 2)]
        self.exec_recs = [os.path.join(self.tmp, "exec-%d.jsonl" % g) for g in (1, 2)]

    # -- configs -------------------------------------------------------------------

    def soak_config(self, gen: int) -> Dict[str, Any]:
        """Generation 1 or 2: different handler names and record files (so each
        record says which config ran it), prefetch, concurrency and workers."""
        prefetch = {"a": 20, "b": 8, "c": 6} if gen == 1 else {"a": 6, "b": 30, "c": 3}
        queues = []
        for k in ("a", "b"):
            h = {"name": "verdict-%s-g%d" % (k, gen), "events": ["#"], "plugin": self.plugin,
                 "config": {"record": self.plugin_recs[gen - 1]}}
            if gen == 2:
                h["concurrency"] = 4
            queues.append({"name": self.queues[k], "bindings": ["%s.*" % k], "prefetch": prefetch[k],
                           "retry": RETRY, "dedupe": {"ttl": "1h"}, "handlers": [h]})
        queues.append({"name": self.queues["c"], "bindings": ["c.*"], "prefetch": prefetch["c"],
                       "retry": RETRY, "dedupe": {"ttl": "1h"},
                       "handlers": [{"name": "exec-c-g%d" % gen, "events": ["#"], "timeout": "30s",
                                     "exec": [ATTEMPTS_HANDLER, self.exec_recs[gen - 1]],
                                     "concurrency": 3 if gen == 1 else 2}]})
        cfg = self.config(queues, workers=4 if gen == 1 else 2, state_dir=os.path.join(self.tmp, "state"))
        cfg["broker"].update({"heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "1s"}})
        return cfg

    def install(self, gen: int) -> None:
        tmp = self.config_path + ".new"
        self.write_config(self.soak_config(gen), os.path.basename(tmp))
        os.replace(tmp, self.config_path)

    # -- faults --------------------------------------------------------------------

    async def daemon_connections(self, pid: int) -> List[str]:
        """The broker's pids of the connections whose client end is one of the
        daemon's sockets (a local port is unique on this host). The text
        format: its `<rabbit@host.N.M.0>` pids are what close_connection takes
        (the JSON formatter writes `#PID<...>`)."""
        ports = local_tcp_ports(pid)
        out = await asyncio.to_thread(run_rabbitmqctl, "list_connections", "-q", "pid", "peer_port")
        conns = []
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0].startswith("<") and parts[1].isdigit() and int(parts[1]) in ports:
                conns.append(parts[0])
        return conns

    @staticmethod
    async def ticks(stop: asyncio.Event, every: float):
        """Yields every `every` seconds until `stop` is set."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), every)
                return
            except asyncio.TimeoutError:
                yield

    async def closer(self, d, stop: asyncio.Event, closed: List[float]) -> None:
        async for _ in self.ticks(stop, CLOSE_EVERY):
            for c in await self.daemon_connections(d.pid):
                try:
                    await asyncio.to_thread(run_rabbitmqctl, "close_connection", c, "soak test")
                    closed.append(time.time())
                except RuntimeError:
                    pass  # already gone

    async def reloader(self, d, stop: asyncio.Event, gens: List[int]) -> None:
        gen = 1
        async for _ in self.ticks(stop, RELOAD_EVERY):
            gen = 3 - gen
            self.install(gen)
            d.send_signal(signal.SIGHUP)
            gens.append(gen)

    # -- records -------------------------------------------------------------------

    def calls(self) -> List[Dict[str, Any]]:
        """Every handler call: {"id", "queue", "attempt", "ok", "gen"}."""
        out = []
        for gen, path in enumerate(self.plugin_recs, 1):
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        r = json.loads(line)
                        out.append({"id": r["event_id"], "attempt": r["attempt"], "ok": r["verdict"] == "ack",
                                    "gen": gen})
        for gen, path in enumerate(self.exec_recs, 1):
            for r in self.read_records(path):
                out.append({"id": r["env"]["EVENT_ID"], "attempt": int(r["env"]["ATTEMPT"]),
                            "ok": r["action"] == "0", "gen": gen})
        return out

    async def publish_all(self, events: List[Dict[str, Any]], rate: float) -> None:
        chunk = 50
        for i in range(0, len(events), chunk):
            t0 = time.monotonic()
            await asyncio.gather(*(self.publish(ev) for ev in events[i:i + chunk]))
            await asyncio.sleep(max(0.0, chunk / rate - (time.monotonic() - t0)))

    async def wait_for(self, d, what: str, cond, timeout: float) -> None:
        """Polls cond() until true; fails at once if the daemon exits."""
        deadline = time.monotonic() + timeout
        while not cond():
            if not d.running():
                self.fail("%s: the daemon exited (status %s)%s" % (what, d.returncode, self._daemon_tail()))
            if time.monotonic() > deadline:
                self.fail("%s: not done within %.0fs%s" % (what, timeout, self._daemon_tail()))
            await asyncio.sleep(0.5)

    # -- the test ------------------------------------------------------------------

    async def test_soak_reloads_and_connection_closes(self):
        t_start = time.monotonic()
        self.install(1)
        d = await self.start_daemon(self.config_path)

        events, kind, queue = [], {}, {}
        for i in range(N_EVENTS):
            k, q = kind_of(i), queue_of(i)
            eid = "soak-%05d-%s-%s-%s" % (i, q, k, uuid.uuid4().hex[:8])
            markers, actions = KINDS[k]
            payload = {"v": markers} if q != "c" else {"actions": actions}
            events.append(self.make_event("%s.soaked" % q, payload, event_id=eid))
            kind[eid], queue[eid] = k, q
        ids = list(kind)
        should_succeed = {e for e in ids if kind[e] in SUCCEEDS}
        should_dead = {e for e in ids if kind[e] not in SUCCEEDS}

        stop = asyncio.Event()
        closed: List[float] = []
        gens: List[int] = []
        faults = [asyncio.create_task(self.closer(d, stop, closed)),
                  asyncio.create_task(self.reloader(d, stop, gens))]
        try:
            # ~100 events/s: the stream lasts long enough for several closes.
            await self.publish_all(events, rate=100.0)

            def all_succeeded():
                return should_succeed <= {c["id"] for c in self.calls() if c["ok"]}

            await self.wait_for(d, "every ack/retry_ack event succeeded", all_succeeded, timeout=300)
            # Keep the faults going until the DLQs are complete too (or time out).
            async def dlq_complete() -> bool:
                n = 0
                for k, q in self.queues.items():
                    n += (await self.message_count(q + ".dlq")) or 0
                return n >= len(should_dead)

            deadline = time.monotonic() + 120
            while not await dlq_complete():
                if time.monotonic() > deadline or not d.running():
                    break
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            fault_errors = [e for e in await asyncio.gather(*faults, return_exceptions=True) if e is not None]
        self.assertEqual(fault_errors, [], "the fault injection itself failed")
        t_faults_end = time.monotonic()

        # The last reload is done (either way), and the daemon is connected again.
        await self.wait_for(d, "the last reload", lambda: len(d.records("reloaded")) + len(
            d.records("reload failed; keeping the running config")) >= len(d.records("reloading")), timeout=60)
        for k, q in self.queues.items():
            await self.wait_queue_counts(q, ready=0, unacked=0, timeout=120)
            for ms in DELAY_STEPS_MS:
                await self.wait_queue_counts("%s.retry.%d" % (q, ms), ready=0, unacked=0, timeout=60)
        await asyncio.sleep(1.0)  # late duplicates would show up now
        self.assertTrue(d.running(), "the daemon died (status %s)" % d.returncode)

        # -- handler calls
        calls = self.calls()
        unknown = {c["id"] for c in calls} - set(ids)
        self.assertEqual(unknown, set(), "handled ids that were never published")
        successes = Counter(c["id"] for c in calls if c["ok"])
        never = sorted(should_succeed - set(successes))
        wrongly = sorted(set(successes) & should_dead)
        too_late = sorted({c["id"] for c in calls if c["attempt"] > MAX_ATTEMPTS})
        dup_success = {e: n for e, n in successes.items() if n > 1}

        # -- dead letters
        dead_ids: Counter = Counter()
        dead_in_wrong_queue = []
        for k, q in self.queues.items():
            for m in await self.get_all(q + ".dlq"):
                eid = json.loads(m.body).get("event_id")
                dead_ids[eid] += 1
                if queue.get(eid) != k:
                    dead_in_wrong_queue.append(eid)
        missing_dead = sorted(should_dead - set(dead_ids))
        unexpected_dead = sorted(set(dead_ids) - should_dead)
        dlq_dups = sum(n - 1 for n in dead_ids.values() if n > 1)

        # -- the daemon ends cleanly
        rc = await d.stop(signal.SIGTERM, timeout=60)

        per_gen = Counter(c["gen"] for c in calls)
        reloads_ok = len(d.records("reloaded"))
        reloads_failed = d.records("reload failed; keeping the running config")
        figs = {
            "events": N_EVENTS, "calls": len(calls), "succeeded": len(successes),
            "dup_successes": sum(n - 1 for n in dup_success.values()), "dup_success_ids": len(dup_success),
            "dead_letters": sum(dead_ids.values()), "dlq_duplicates": dlq_dups,
            "closes": len(closed), "connection_lost_logged": len(d.records("connection lost")),
            "sighups": len(gens), "reloaded": reloads_ok, "reload_failed": len(reloads_failed),
            "calls_per_config": dict(per_gen), "exit": rc,
            "seconds_with_faults": round(t_faults_end - t_start, 1),
            "seconds_total": round(time.monotonic() - t_start, 1),
        }
        sys.stderr.write("\nSOAK-RESULT %s\n" % " ".join("%s=%s" % (k, json.dumps(v)) for k, v in figs.items()))
        if dup_success:
            sys.stderr.write("SOAK-DUPLICATE-SUCCESSES e.g. %s\n" % sorted(dup_success.items())[:10])
        sys.stderr.flush()

        self.assertEqual(never, [], "%d ack/retry_ack event(s) never succeeded" % len(never))
        self.assertEqual(wrongly, [], "dead/exhaust event(s) succeeded")
        self.assertEqual(too_late, [], "event(s) ran past max_attempts=%d" % MAX_ATTEMPTS)
        self.assertEqual(missing_dead, [], "%d dead/exhaust event(s) missing from the DLQs" % len(missing_dead))
        self.assertEqual(unexpected_dead, [], "dead-lettered events that should have succeeded")
        self.assertEqual(dead_in_wrong_queue, [], "dead letters in another queue's DLQ")
        self.assertEqual(dup_success, {}, "dedupe on, yet %d event(s) succeeded more than once"
                         % len(dup_success))
        self.assertGreaterEqual(len(closed), 2, "the broker closed the daemon's connection fewer than 2 times")
        self.assertGreater(per_gen[1], 0, "config 1's handlers never ran")
        self.assertGreater(per_gen[2], 0, "config 2's handlers never ran")
        self.assertGreaterEqual(reloads_ok, 3, "fewer than 3 reloads succeeded")
        self.assertEqual(rc, 0, "exit status after SIGTERM")


if __name__ == "__main__":
    unittest.main()
