"""Faults on a real three-node RabbitMQ cluster (issue 13, "How to show it";
docs/scaling.md, "Faults on a cluster"), one cluster (cluster.Cluster) and one
PostgreSQL (pg_node.PgNode) for the whole module.

Every test runs events through a `type: quorum` queue (its delay and
dead-letter queues quorum too) with `dedupe` on the shared PostgreSQL store,
retries (1 s delay; every 10th event asks for a retry on its first attempt)
and `broker.urls` listing all three nodes. The handler is
handlers/record_runs.c: one line when a run starts and one when it ends
(event id, attempt, daemon pid, time, verdict). ER_CLUSTER_N events (default
2000) are published at a steady rate through a node the fault leaves alone,
and a fault is injected a quarter of the way through (every 50th event runs
300 ms longer, so runs are going on when a connection breaks):

1. the node the daemon is connected to is stopped (`rabbitmqctl stop`), then
   started again;
2. the node the daemon is connected to is killed (SIGKILL to its beam), then
   started again;
3. the work queue's leader moves: its node is drained (`rabbitmq-upgrade
   drain`, which hands quorum leaderships to the other members) while the
   daemon is connected to another node, then revived;
4. one of two router instances (same config, shared store) is SIGKILLed
   while it runs a slow event (every 25th event runs 300 ms longer there).

Each test asserts: every event succeeded; no event succeeded twice after a
broker-side fault (1-3); after the SIGKILL (4) only events the killed
instance had started ran again, at most its prefetch; every retried event's
second attempt started at least the delay after its first ended; at the end
the work, delay and dead-letter queues are empty; the daemon never exited.
The time to resume (from the fault to the first success of an event
published after the daemon's connection broke, or after the fault when it
does not break), the longest pause in successes, the cluster's start and the
module's total time are printed as CLUSTER-RESULT lines, never asserted.
The cluster runs with a 5 s `dead_letter_worker_publisher_confirm_timeout`
(see DLX_TIMEOUT_MS below and docs/scaling.md).
"""
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List

import aio_pika

from cluster import Cluster
from broker_node import http_get
from harness import HERE, SOURCE_DIR, RouterTestCase
import pg_node

N = int(os.environ.get("ER_CLUSTER_N", "2000"))
RATE = 250.0        # events published per second
RETRY_EVERY = 10    # every 10th event asks for a retry on attempt 1
DELAY = 1.0         # the queue's retry delay, seconds
PREFETCH = 20
SLEEP_US = 2000     # each run takes 2 ms, so events are in flight at the fault
# RabbitMQ's at-least-once dead-lettering sends a dead letter whose target
# did not confirm it (the target queue's leader went away) again only after
# this long: 180 s by default on 3.10, 5 s on this module's cluster
# (ER_CLUSTER_DLX_TIMEOUT_MS=default leaves the broker's own). It can take
# two rounds: waits allow for that.
DLX_TIMEOUT_MS = os.environ.get("ER_CLUSTER_DLX_TIMEOUT_MS", "5000")
DLX_TIMEOUT = 180.0 if DLX_TIMEOUT_MS == "default" else int(DLX_TIMEOUT_MS) / 1000


def result(text: str) -> None:
    sys.stderr.write("\nCLUSTER-RESULT %s\n" % text)
    sys.stderr.flush()


def log_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


@dataclass
class Run:
    phase: str      # "S" (started) or "E" (ended)
    event_id: str
    attempt: int
    pid: int
    t: float        # unix seconds
    verdict: int    # E: 0 ack, 1 retry; S: -1


class RunLog:
    """A record file read incrementally: each read() parses only the new lines."""

    def __init__(self, path: str):
        self.path, self.offset, self.partial, self.runs = path, 0, b"", []

    def read(self) -> List[Run]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.runs
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for its end
        for line in lines:
            p = line.decode().split()
            if len(p) >= 5:
                self.runs.append(Run(p[0], p[1], int(p[2]), int(p[3]), int(p[4]) / 1e6,
                                     int(p[5]) if len(p) > 5 else -1))
        return self.runs


_LOGS: Dict[str, RunLog] = {}


def read_runs(path: str) -> List[Run]:
    """Every run recorded in `path` so far (the list grows; do not change it)."""
    return _LOGS.setdefault(path, RunLog(path)).read()


def successes(runs: List[Run]) -> Dict[str, List[Run]]:
    out: Dict[str, List[Run]] = defaultdict(list)
    for r in runs:
        if r.phase == "E" and r.verdict == 0:
            out[r.event_id].append(r)
    return out


@unittest.skipUnless(pg_node.available(), "PostgreSQL 15 server binaries not installed (scripts/install-deps.sh)")
class ClusterFaultsTest(RouterTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        t0 = time.monotonic()
        # Class cleanups run last-in first-out: this one after the cluster's close.
        cls.addClassCleanup(lambda: result("module total %.1fs (cluster start, %d tests, cluster close)"
                                           % (time.monotonic() - t0, cls.tests_run)))
        cls.tests_run = 0
        # Queue counts (list_queues) of quorum queues are refreshed on the
        # leader's tick: every second here, not every 5 s.
        rabbit = ["{quorum_tick_interval, 1000}"]
        if DLX_TIMEOUT_MS != "default":
            rabbit.append("{dead_letter_worker_publisher_confirm_timeout, %d}" % int(DLX_TIMEOUT_MS))
        advanced = "[{rabbit, [%s]}]" % ", ".join(rabbit)
        cls.cluster = Cluster.for_class(cls, 3, advanced_config=advanced)
        result("cluster of 3 nodes started and joined in %.1fs" % cls.cluster.started_in)
        cls.pg = pg_node.PgNode.for_class(cls)
        cls.lib_dir = tempfile.mkdtemp(prefix="er-cluster-faults-")
        cls.addClassCleanup(shutil.rmtree, cls.lib_dir, True)
        cls.plugin = os.path.join(cls.lib_dir, "librecord_runs.so")
        p = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
                            "-I" + os.path.join(SOURCE_DIR, "include"), "-o", cls.plugin,
                            os.path.join(HERE, "handlers", "record_runs.c")], capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError("compiling record_runs.c failed:\n" + p.stderr)

    async def asyncSetUp(self):
        await super().asyncSetUp()
        type(self).tests_run += 1
        # A test that failed half-way may have left a node stopped or drained.
        for n in self.cluster.nodes:
            if not n.running():
                await asyncio.to_thread(n.start)
        await asyncio.to_thread(self.cluster.wait_members, 3, 120)
        self.published_at: Dict[str, float] = {}
        self.addAsyncCleanup(self.delete_cluster_queues)

    # -- config and instances --------------------------------------------------------

    def node_config(self, q: str, record: str, first: int, sleep_us: int = SLEEP_US, threads: int = 2) -> str:
        """One config; broker.urls lists every node, starting with node `first`."""
        nodes = self.cluster.nodes
        urls = [nodes[(first + i) % len(nodes)].url for i in range(len(nodes))]
        queue = {"name": q, "bindings": ["cf.*"], "type": "quorum", "prefetch": PREFETCH,
                 "retry": {"max_attempts": 3, "delay": "%dms" % (DELAY * 1000), "multiplier": 1,
                           "max_delay": "%dms" % (DELAY * 1000)},
                 "dedupe": {"ttl": "1h"},
                 "handlers": [{"name": "rec", "events": ["#"], "plugin": self.plugin,
                               "config": {"file": record, "sleep_us": sleep_us}}]}
        key = os.path.join(self.tmp, "copy.key")
        if not os.path.exists(key):
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_bytes(32))
            os.close(fd)
        cfg = self.config([queue], state_dir="${STATE_DIR}", security={"copy_key_file": key},
                          plugin_threads=threads, http={"listen": "127.0.0.1:0"},
                          broker={"urls": urls, "heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "1s"}},
                          # A short lease: a killed instance's claims hold its events back this long.
                          dedupe_store={"postgres": "${ER_TEST_PG_URL}", "timeout": "2s", "lease": "3s"})
        return self.write_config(cfg, "router-%d.yaml" % first)

    async def start_instance(self, path: str, name: str):
        env = {"ER_TEST_PG_URL": self.pg.url, "STATE_DIR": os.path.join(self.tmp, "state-" + name)}
        return await self.start_daemon(path, env=env, ready_timeout=60)

    def node_by_port(self, port: int):
        return next(n for n in self.cluster.nodes if n.port == port)

    def connected_node(self, d):
        """The node of the daemon's last `connected` record."""
        recs = d.records("connected")
        self.assertTrue(recs, d.tail())
        m = re.search(r":(\d+)/?$", recs[-1].fields["broker"])
        return self.node_by_port(int(m.group(1)))

    async def queue_rows(self, q: str) -> Dict[str, Dict[str, Any]]:
        via = next(n for n in self.cluster.nodes if n.running())
        rows = await asyncio.to_thread(via.ctl_json, "list_queues", "name", "type", "leader", "messages")
        return {r["name"]: r for r in rows if str(r.get("name", "")).startswith(q)}

    async def delete_cluster_queues(self):
        via = next((n for n in self.cluster.nodes if n.running()), None)
        if via is None:
            return
        try:
            conn = await aio_pika.connect(via.url)
        except Exception:
            return
        try:
            for n in self._queues + [q + ".retry.%d" % (DELAY * 1000) for q in self._queues]:
                try:
                    ch = await conn.channel()
                    await ch.queue_delete(n)
                    await ch.close()
                except Exception:
                    pass
        finally:
            await conn.close()

    # -- events ---------------------------------------------------------------------

    def events(self, slow_every: int = 0) -> List[Dict[str, Any]]:
        """N events; every RETRY_EVERY-th asks for a retry on attempt 1 (their
        ids: self.retried); with `slow_every`, every such event (offset 5) runs
        300 ms longer (their ids: self.slow)."""
        evs = []
        for i in range(N):
            payload: Dict[str, Any] = {"n": i}
            if i % RETRY_EVERY == 0:
                payload["retry_first"] = 1
            if slow_every and i % slow_every == 5:
                payload["slow_us"] = 300000
            evs.append(self.make_event("cf.happened", payload, event_id="cf-%04d-%s" % (i, secrets.token_hex(4))))
        self.retried = {e["event_id"] for e in evs if e["payload"].get("retry_first")}
        self.slow = {e["event_id"] for e in evs if e["payload"].get("slow_us")}
        return evs

    async def publish_steadily(self, node, events: List[Dict[str, Any]], batch: int = 25) -> None:
        """Publishes `events` through `node` at RATE per second, in confirmed
        batches; records when each batch's publish began."""
        conn = await aio_pika.connect(node.url)
        try:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange(self.exchange, ensure=True)
            t0 = time.monotonic()
            for i in range(0, len(events), batch):
                chunk = events[i:i + batch]
                now = time.time()
                for e in chunk:
                    self.published_at[e["event_id"]] = now
                await asyncio.gather(*[ex.publish(aio_pika.Message(
                    body=json.dumps(e).encode(), content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=e["event_id"]),
                    routing_key=e["event_type"]) for e in chunk])
                ahead = t0 + (i + batch) / RATE - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            self.published_until = time.time()
        finally:
            await conn.close()

    async def wait_successes(self, record: str, count: int, timeout: float, daemons=()) -> None:
        deadline = time.monotonic() + timeout
        while len(successes(read_runs(record))) < count:
            for d in daemons:
                if not d.running():
                    self.fail("daemon %d exited (%s)%s" % (d.pid, d.returncode, self._daemon_tail()))
            if time.monotonic() > deadline:
                self.fail("%d of %d events succeeded within %.0fs%s"
                          % (len(successes(read_runs(record))), count, timeout, self._daemon_tail()))
            await asyncio.sleep(0.05)

    async def wait_resumed(self, record: str, t_fault: float, since: float = 0.0, timeout: float = 90.0) -> float:
        """Seconds from the fault to the first success of an event published
        after `since` (default: the fault)."""
        since = max(since, t_fault)
        deadline = time.monotonic() + timeout
        while True:
            after = [r.t for i, rs in successes(read_runs(record)).items()
                     if self.published_at.get(i, 0) >= since for r in rs]
            if after:
                return min(after) - t_fault
            if time.monotonic() > deadline:
                self.fail("no event published after the fault succeeded within %.0fs%s"
                          % (timeout, self._daemon_tail()))
            await asyncio.sleep(0.05)

    # -- checks ---------------------------------------------------------------------

    def longest_pause(self, runs: List[Run], t_fault: float) -> float:
        """The longest time without a success from the fault until the
        publisher stopped (events kept coming, RATE a second, all along)."""
        ts = sorted(r.t for r in runs if r.phase == "E" and r.verdict == 0 and t_fault <= r.t <= self.published_until)
        return max(b - a for a, b in zip([t_fault] + ts, ts + [self.published_until]))

    def check_runs(self, runs: List[Run], events, pids, broker_fault: bool) -> Dict[str, List[Run]]:
        ok = successes(runs)
        ids = [e["event_id"] for e in events]
        missing = [i for i in ids if i not in ok]
        self.assertEqual(missing, [], "%d events never succeeded" % len(missing))
        self.assertEqual({r.pid for r in runs} - set(pids), set(), "runs by an unknown process")
        retried = self.retried
        for i in ids:
            want = 2 if i in retried else 1
            self.assertTrue(all(r.attempt == want for r in ok[i]), (i, ok[i]))
        if broker_fault:
            twice = {i: rs for i, rs in ok.items() if len(rs) > 1}
            self.assertEqual(twice, {}, "events that succeeded twice after a broker-side fault")
        # Retries still wait: attempt 2 starts at least DELAY after attempt 1 ended.
        first_end = {}
        for r in runs:
            if r.phase == "E" and r.attempt == 1 and r.verdict == 1:
                first_end[r.event_id] = min(first_end.get(r.event_id, r.t), r.t)
        gaps = []
        for r in runs:
            if r.phase == "S" and r.attempt == 2:
                self.assertIn(r.event_id, first_end, r)
                gaps.append(r.t - first_end[r.event_id])
        self.assertEqual(set(first_end), retried)
        self.assertGreaterEqual(min(gaps), DELAY - 0.002, "a retry ran before its delay")
        self.gap_range = (min(gaps), max(gaps))
        return ok

    async def wait_queues_empty(self, q: str, daemons, timeout: float = 2 * DLX_TIMEOUT + 60) -> float:
        """Waits, with the daemons running, until the work, delay and dead-letter
        queues hold nothing (ready, unacked, or owed by the broker's
        dead-lettering) in two listings a tick apart, then stops the daemons and
        checks the queues' own answer (a passive declare). Returns the seconds
        it waited. Dead letters whose confirm the broker lost at the fault are
        sent again after DLX_TIMEOUT: duplicates, which the dedupe store skips."""
        names = [q, q + ".retry.%d" % (DELAY * 1000), q + ".dlq"]
        t0 = time.monotonic()
        deadline = t0 + timeout
        zero_since = None
        while True:
            rows = await self.queue_rows(q)
            self.assertEqual(set(rows), set(names), rows)
            for n in names:
                self.assertEqual(rows[n]["type"], "quorum", rows[n])
            held = {n: rows[n]["messages"] for n in names}
            if any(held.values()):
                zero_since = None
            elif zero_since is None:
                zero_since = time.monotonic()
            elif time.monotonic() - zero_since >= 1.5:
                break
            for d in daemons:
                self.assertTrue(d.running(), d.tail())
            if time.monotonic() > deadline:
                self.fail("queues not empty after %.0fs: %r%s" % (timeout, held, self._daemon_tail()))
            await asyncio.sleep(0.5)
        waited = zero_since - t0
        self.duplicates = 0
        for d in daemons:
            self.duplicates += await self.duplicates_skipped(d)
            self.assertEqual(await d.stop(), 0, d.tail())
        via = next(n for n in self.cluster.nodes if n.running())
        conn = await aio_pika.connect(via.url)
        try:
            ch = await conn.channel()
            for n in names:
                got = await ch.declare_queue(n, passive=True)
                self.assertEqual(got.declaration_result.message_count, 0, n)
        finally:
            await conn.close()
        return waited

    async def duplicates_skipped(self, d) -> int:
        port = int((await d.wait_for_record("http listening"))[0].fields["port"])
        _, _, body = await asyncio.to_thread(http_get, "http://127.0.0.1:%d/metrics" % port)
        m = re.findall(r'^event_router_duplicates_skipped_total\{[^}]*\} (\d+)', body, re.M)
        return sum(int(x) for x in m)

    def starts_again(self, runs: List[Run]) -> Dict[str, List[Run]]:
        """Events with more than one start of the same attempt."""
        by: Dict[Any, List[Run]] = defaultdict(list)
        for r in runs:
            if r.phase == "S":
                by[(r.event_id, r.attempt)].append(r)
        return {k[0]: rs for k, rs in by.items() if len(rs) > 1}

    # -- the broker-side faults -----------------------------------------------------

    async def broker_fault(self, name: str, first: int, fault, recover) -> None:
        """Runs the flow with the daemon on node `first`; `fault(node)` and
        `recover(node)` act on the node it is connected to."""
        q = self.queue_name("work")
        record = os.path.join(self.tmp, "runs.txt")
        # Every 50th event runs 300 ms: some are running when the connection breaks.
        d = await self.start_instance(self.node_config(q, record, first, threads=4), "a")
        target = self.connected_node(d)
        self.assertIs(target, self.cluster.nodes[first])
        publisher = next(n for n in self.cluster.nodes if n is not target)
        events = self.events(slow_every=50)
        pub = asyncio.ensure_future(self.publish_steadily(publisher, events))
        await self.wait_successes(record, N // 4, 60, [d])
        lost_before = len(d.records("connection lost"))
        t_fault = time.time()
        await asyncio.to_thread(fault, target)
        fault_took = time.time() - t_fault
        lost = (await d.wait_for_record("connection lost", count=lost_before + 1, timeout=30))[lost_before:]
        # Events published after the connection broke need the whole path again.
        resumed = await self.wait_resumed(record, t_fault, since=log_time(lost[0].time))
        connected = [log_time(r.time) for r in d.records("connected") if log_time(r.time) >= t_fault]
        self.assertTrue(connected, d.tail())
        self.assertIsNot(self.connected_node(d), target)
        # The node comes back while the rest of the flow is handled.
        t_back = time.monotonic()
        back = asyncio.ensure_future(asyncio.to_thread(recover, target))
        await pub
        await self.wait_successes(record, N, 120 + 2 * DLX_TIMEOUT, [d])
        all_ok = time.time() - t_fault
        await back
        await asyncio.to_thread(self.cluster.wait_members, 3, 120)
        node_back = time.monotonic() - t_back
        emptied = await self.wait_queues_empty(q, [d])
        runs = read_runs(record)
        self.check_runs(runs, events, [d.pid], broker_fault=True)
        again = self.starts_again(runs)
        # Runs that started before the connection broke and ended after it:
        # their redeliveries waited for them, then were duplicates.
        t_lost = log_time(lost[0].time)
        ends = {(r.event_id, r.attempt): r.t for r in runs if r.phase == "E"}
        across = {r.event_id for r in runs
                  if r.phase == "S" and r.t < t_lost < ends.get((r.event_id, r.attempt), 0)}
        result("%s: %d events (%d retried once); %d runs were going on when the connection broke; "
               "fault took %.1fs; connection lost %.2fs and connected to "
               "the next node %.2fs after the fault; time to resume %.2fs after the fault (first success of "
               "an event published after the connection broke); longest pause in successes %.2fs; every event "
               "succeeded %.1fs after the fault; node back in the "
               "cluster %.1fs after its restart began; runs started twice: %d (attempt 1 of a retried event: "
               "%d); succeeded twice: 0; queues empty after a further %.1fs; duplicates skipped by the "
               "dedupe store: %d; retry gap %.2f-%.2fs (delay %.1fs)"
               % (name, N, N // RETRY_EVERY, len(across), fault_took, log_time(lost[0].time) - t_fault,
                  min(connected) - t_fault, resumed, self.longest_pause(runs, t_fault), all_ok, node_back,
                  len(again),
                  sum(1 for i, rs in again.items() if rs[0].attempt == 1 and i in self.retried),
                  emptied, self.duplicates, self.gap_range[0], self.gap_range[1], DELAY))

    async def test_connected_node_stopped_and_started_again(self):
        await self.broker_fault("node stopped", 1, lambda n: n.stop(), lambda n: n.start())

    async def test_connected_node_killed_and_started_again(self):
        await self.broker_fault("node killed (SIGKILL)", 2, lambda n: n.kill(), lambda n: n.start())

    # -- the leader moves -----------------------------------------------------------

    async def test_queue_leader_moves_while_connected_elsewhere(self):
        q = self.queue_name("work")
        record = os.path.join(self.tmp, "runs.txt")
        nodes = self.cluster.nodes
        # A quorum queue's first leader is the declaring node (queue_leader_locator
        # client-local): declare through node 0 with a first instance, then
        # run the flow with the daemon on node 1 and the publisher on node 2.
        first = await self.start_instance(self.node_config(q, record, 0, threads=4), "declare")
        self.assertEqual(await first.stop(), 0, first.tail())
        rows = await self.queue_rows(q)
        leader = next(n for n in nodes if n.nodename == rows[q]["leader"])
        d = await self.start_instance(self.node_config(q, record, 1, threads=4), "a")
        self.assertIs(self.connected_node(d), nodes[1])
        self.assertIsNot(leader, nodes[1], rows[q])
        publisher = next(n for n in nodes if n is not leader and n is not nodes[1])
        events = self.events(slow_every=50)
        pub = asyncio.ensure_future(self.publish_steadily(publisher, events))
        await self.wait_successes(record, N // 4, 60, [d])
        drained = [leader]

        def revive_if_drained():  # a failed test must not leave a node in maintenance for the next
            for n in drained:
                n.ctl("revive", tool="rabbitmq-upgrade", timeout=120)

        self.addCleanup(revive_if_drained)
        t_fault = time.time()
        await asyncio.to_thread(leader.ctl, "drain", tool="rabbitmq-upgrade", timeout=120)
        fault_took = time.time() - t_fault
        resumed = await self.wait_resumed(record, t_fault)
        new_leader = (await self.queue_rows(q))[q]["leader"]
        self.assertNotEqual(new_leader, leader.nodename)
        await asyncio.to_thread(leader.ctl, "revive", tool="rabbitmq-upgrade", timeout=120)
        drained.clear()
        await pub
        await self.wait_successes(record, N, 120 + 2 * DLX_TIMEOUT, [d])
        all_ok = time.time() - t_fault
        self.assertEqual(d.records("connection lost"), [], "the daemon's node was not touched")
        emptied = await self.wait_queues_empty(q, [d])
        runs = read_runs(record)
        self.check_runs(runs, events, [first.pid, d.pid], broker_fault=True)
        result("leader moved (rabbitmq-upgrade drain of the leader's node, daemon on another node): %d events; "
               "drain took %.1fs; leader %s -> %s; time to resume %.2fs (first success of an event published "
               "after the drain began); longest pause in successes %.2fs; every event succeeded %.1fs after "
               "it; runs started twice: %d; succeeded twice: 0; queues empty after a further %.1fs; "
               "duplicates skipped: %d; retry gap %.2f-%.2fs"
               % (N, fault_took, leader.nodename.split("@")[0], new_leader.split("@")[0], resumed,
                  self.longest_pause(runs, t_fault), all_ok,
                  len(self.starts_again(runs)), emptied, self.duplicates, self.gap_range[0], self.gap_range[1]))

    # -- a router instance SIGKILLed ------------------------------------------------

    async def test_router_instance_sigkilled_other_goes_on(self):
        q = self.queue_name("work")
        record = os.path.join(self.tmp, "runs.txt")
        # Every 25th event runs 300 ms: a has one running when it is killed.
        path = self.node_config(q, record, 0, threads=4)
        a = await self.start_instance(path, "a")
        b = await self.start_instance(path, "b")
        publisher = self.cluster.nodes[1]
        events = self.events(slow_every=25)
        pub = asyncio.ensure_future(self.publish_steadily(publisher, events))
        deadline = time.monotonic() + 60
        while True:
            runs = read_runs(record)
            ok = successes(runs)
            by_a = sum(1 for rs in ok.values() for r in rs if r.pid == a.pid)
            running_on_a = ({(r.event_id, r.attempt) for r in runs if r.phase == "S" and r.pid == a.pid}
                            - {(r.event_id, r.attempt) for r in runs if r.phase == "E" and r.pid == a.pid})
            if (len(ok) >= N // 4 and by_a >= 50 and {i for i, _ in running_on_a} & self.slow
                    and any(r.pid == b.pid for rs in ok.values() for r in rs)):
                break
            if time.monotonic() > deadline:
                self.fail("both instances should handle events (%d ok, %d by a)%s"
                          % (len(ok), by_a, self._daemon_tail()))
            await asyncio.sleep(0.05)
        t_kill = time.time()
        a.kill()
        self.assertEqual(await a.wait_exit(10), -signal.SIGKILL)
        # The next success on b after the kill (b never stopped).
        deadline = time.monotonic() + 30
        while True:
            after = [r.t for rs in successes(read_runs(record)).values() for r in rs
                     if r.pid == b.pid and r.t > t_kill]
            if after:
                next_ok = min(after) - t_kill
                break
            if time.monotonic() > deadline:
                self.fail("b handled nothing after the kill" + self._daemon_tail())
            await asyncio.sleep(0.02)
        await pub
        await self.wait_successes(record, N, 120 + 2 * DLX_TIMEOUT, [b])
        emptied = await self.wait_queues_empty(q, [b])
        runs = read_runs(record)
        ok = self.check_runs(runs, events, [a.pid, b.pid], broker_fault=False)
        # Only events a had started (in flight: running, or finished with the
        # ack or its done mark not out) run again, on b after the kill; at most
        # a's prefetch.
        started_by_a = {r.event_id for r in runs if r.phase == "S" and r.pid == a.pid}
        unfinished_on_a = {i for i, att in
                           {(r.event_id, r.attempt) for r in runs if r.phase == "S" and r.pid == a.pid}
                           - {(r.event_id, r.attempt) for r in runs if r.phase == "E" and r.pid == a.pid}}
        self.assertTrue(unfinished_on_a, "a had nothing running at the kill")
        again = self.starts_again(runs)
        self.assertLessEqual(unfinished_on_a, set(again))
        for i, rs in again.items():
            self.assertIn(i, started_by_a, rs)
            self.assertEqual(len(rs), 2, rs)
            first, second = sorted(rs, key=lambda r: r.t)
            self.assertEqual((first.pid, second.pid), (a.pid, b.pid), rs)
            self.assertGreater(second.t, t_kill)
        self.assertLessEqual(len(again), PREFETCH)
        twice = {i for i, rs in ok.items() if len(rs) > 1}
        self.assertLessEqual(twice, set(again))
        finished_by_a = {(r.event_id, r.attempt) for r in runs if r.phase == "E" and r.pid == a.pid}
        done_again = max((r.t for i in again for r in ok[i] if r.pid == b.pid), default=t_kill) - t_kill
        again_finished = sum(1 for i, rs in again.items() if (i, rs[0].attempt) in finished_by_a)
        result("router instance SIGKILLed (other instance goes on, shared store, lease 3s): %d events, "
               "%d by a, %d by b, next success on b %.2fs after the kill, run again: %d (prefetch %d; running "
               "on a at the kill: %d; finished on a, ack or done mark not out: %d), succeeded twice: %d, the "
               "killed instance's in-flight events all handled %.1fs after the kill (its dedupe claims hold "
               "them for the lease), queues empty after a further %.1fs; duplicates skipped: %d; retry gap "
               "%.2f-%.2fs"
               % (N, sum(1 for r in runs if r.phase == "S" and r.pid == a.pid),
                  sum(1 for r in runs if r.phase == "S" and r.pid == b.pid), next_ok, len(again), PREFETCH,
                  len(unfinished_on_a), again_finished, len(twice), done_again, emptied, self.duplicates,
                  self.gap_range[0], self.gap_range[1]))


if __name__ == "__main__":
    unittest.main()
