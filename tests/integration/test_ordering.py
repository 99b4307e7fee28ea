"""`ordering: aggregate` through the real broker (docs/ordering.md): each
aggregate's events reach the handler one at a time in publish order, with
random handler delays, across retries held in place, across a dead-lettered
head event, across a SIGTERM and restart; events of different aggregates (and
events without an aggregate id) run side by side.

Order and overlap are read from the recording handler's own lines
(handlers/record.py --done: a "start" line when a run begins, a "done" line
when it ends, appended under a lock), in file order: a run that starts after
another's "done" line really started after it ended. No assertion rests on
timings."""
import asyncio
import os
import random
import signal
import time
from collections import defaultdict
from typing import Any, Dict, List

from harness import run_rabbitmqctl
from test_http_metrics import HttpTestBase, value
from test_soak import local_tcp_ports


def runs_by_line(records: List[Dict[str, Any]]):
    """Yields (record, in_progress) for every line in file order, where
    in_progress maps pid -> start record of the runs going on after it."""
    in_progress: Dict[int, Dict[str, Any]] = {}
    for r in records:
        if r["phase"] == "start":
            in_progress[r["pid"]] = r
        elif r["phase"] == "done":
            in_progress.pop(r["pid"], None)
        yield r, in_progress


class OrderingTest(HttpTestBase):
    def ordered_queue(self, short="work", prefetch=40, concurrency=8, retry=None, **extra):
        q = self.queue_name(short)
        h = self.recorder("rec", events=["#"], args=["--done"], concurrency=concurrency, timeout="30s")
        self.rec = h["exec"][1]
        queue = {"name": q, "bindings": ["o.*"], "prefetch": prefetch, "ordering": "aggregate",
                 "handlers": [h],
                 "retry": retry or {"max_attempts": 5, "delay": "300ms", "multiplier": 2, "max_delay": "5s"}}
        queue.update(extra)
        return q, queue

    def event(self, agg, seq, **payload):
        payload = dict(payload, seq=seq)
        return self.make_event("o.changed", payload, aggregate_id=agg)

    def all_records(self):
        return self.read_records(self.rec, phase=None)

    async def wait_done(self, count, timeout=60.0, successes=False):
        """Waits until `count` runs have a done line (exit 0 only when `successes`)."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in self.read_records(self.rec, "done") if not successes or r["exit"] == 0]
            if len(done) >= count:
                return done
            if time.monotonic() > deadline:
                self.fail("wanted %d finished runs, have %d%s" % (count, len(done), self._daemon_tail()))
            await asyncio.sleep(0.05)

    async def wait_metric(self, name, want, timeout=30.0, **labels):
        deadline = time.monotonic() + timeout
        while True:
            m = await self.metrics()
            if value(m, name, **labels) == want:
                return m
            if time.monotonic() > deadline:
                self.fail("%s%r: wanted %r, have %r%s" % (name, labels, want, value(m, name, **labels),
                                                          self._daemon_tail()))
            await asyncio.sleep(0.1)

    def seq_of(self, r):
        return self.by_id[r["event_id"]][1]

    def assert_in_order(self, records, expect_repeats=False):
        """Per aggregate: at most one run at any moment; every run of an event
        starts after the previous event of its aggregate finished with a
        success; the first runs come in publish order. Returns
        {aggregate: [seq of every start]}."""
        starts = defaultdict(list)
        finished_ok = defaultdict(set)  # aggregate -> seqs whose run ended with exit 0
        for r, running in runs_by_line(records):
            if r["phase"] == "done":
                if r["exit"] == 0:
                    finished_ok[r["aggregate_id"]].add(self.seq_of(r))
                continue
            agg, seq = r["aggregate_id"], self.seq_of(r)
            others = [o for pid, o in running.items() if pid != r["pid"] and o["aggregate_id"] == agg]
            self.assertEqual(others, [], "aggregate %s: seq %d started while another of its events ran" % (agg, seq))
            if seq > 0:
                self.assertIn(seq - 1, finished_ok[agg] | self.dead_lettered.get(agg, set()),
                              "aggregate %s: seq %d started before seq %d finished" % (agg, seq, seq - 1))
            starts[agg].append(seq)
        for agg, seqs in starts.items():
            self.assertEqual(seqs, sorted(seqs), "aggregate %s ran out of order: %r" % (agg, seqs))
            if not expect_repeats:
                self.assertEqual(len(seqs), len(set(seqs)), "aggregate %s: a run repeated: %r" % (agg, seqs))
        return starts

    async def publish_interleaved(self, aggs, per_agg, rng, **payload_for):
        """Publishes per_agg events for each aggregate, interleaved at random,
        each aggregate's in seq order; returns them in publish order."""
        pending = {a: 0 for a in aggs}
        published = []
        while pending:
            a = rng.choice(sorted(pending))
            seq = pending[a]
            extra = payload_for.get("payload", lambda a, s: {})(a, seq)
            ev = self.event(a, seq, sleep=round(rng.uniform(0.0, 0.12), 3), **extra)
            await self.publish(ev)
            published.append(ev)
            self.by_id[ev["event_id"]] = (a, seq)
            pending[a] += 1
            if pending[a] == per_agg:
                del pending[a]
        return published

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.by_id = {}
        self.dead_lettered = {}

    # -- tests -----------------------------------------------------------------

    async def test_interleaved_aggregates_run_in_publish_order_with_random_delays(self):
        rng = random.Random(11)
        q, queue = self.ordered_queue(prefetch=40, concurrency=8)
        await self.start_daemon(self.write_config(self.config([queue])))
        aggs = ["agg-%02d" % i for i in range(12)]
        await self.publish_interleaved(aggs, 8, rng)
        await self.wait_done(12 * 8)
        starts = self.assert_in_order(self.all_records())
        self.assertEqual({a: s for a, s in starts.items()}, {a: list(range(8)) for a in aggs})
        await self.wait_queue_counts(q, ready=0, unacked=0)

    async def test_camel_case_aggregate_ids_are_ordered_too(self):
        q, queue = self.ordered_queue(prefetch=20, concurrency=10)
        await self.start_daemon(self.write_config(self.config([queue])))
        rng = random.Random(5)
        events = []
        for seq in range(8):
            ev = self.make_camel_event("o.changed", {"seq": seq, "sleep": round(rng.uniform(0, 0.15), 3)},
                                       aggregateId="speaker-1")
            events.append(ev)
            self.by_id[ev["eventId"]] = ("speaker-1", seq)
        await self.publish_camel(events)
        await self.wait_done(8)
        self.assertEqual(self.assert_in_order(self.all_records()), {"speaker-1": list(range(8))})

    async def test_a_retry_waits_in_place_and_is_not_overtaken(self):
        # The head of aggregate A fails its first attempt; its second event must
        # wait for the retry (held in place, unacked), which sees attempt 2.
        retry = {"max_attempts": 3, "delay": "6s", "multiplier": 1, "max_delay": "6s"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry)
        await self.start_daemon(self.http_config(self.config([queue])))
        head = self.event("A", 0, fail_attempts=1)
        second = self.event("A", 1)
        other = self.event("B", 0)
        for ev, seq in ((head, 0), (second, 1), (other, 0)):
            self.by_id[ev["event_id"]] = (ev["aggregate_id"], seq)
            await self.publish(ev)
        await self.wait_done(2)  # the head's failed attempt and B
        # While the head waits in place: nothing in a delay queue, the head and
        # the event behind it unacked, and the gauges say so.
        m = await self.wait_metric("event_router_ordering_held_events", 1.0, queue=q)
        self.assertEqual(value(m, "event_router_ordering_waiting_events", queue=q), 1.0)
        self.assertGreater(value(m, "event_router_ordering_longest_wait_seconds", queue=q), 0.0)
        self.assertEqual(value(m, "event_router_retries_in_place_total", queue=q, reason="handler_failed"), 1.0)
        self.assertEqual(len(self.read_records(self.rec, "start")), 2, "the second event of A overtook its head")
        await self.wait_queue_counts(q, ready=0, unacked=2)
        await self.wait_done(4)
        recs = self.all_records()
        starts = self.assert_in_order(recs, expect_repeats=True)
        self.assertEqual(starts["A"], [0, 0, 1])
        attempts = [(r["event_id"], r["attempt"]) for r in recs if r["phase"] == "start"]
        self.assertEqual([a for e, a in attempts if e == head["event_id"]], [1, 2])
        self.assertEqual([a for e, a in attempts if e == second["event_id"]], [1])
        await self.wait_queue_counts(q, ready=0, unacked=0)
        self.assertEqual(await self.message_count(q + ".retry.6000"), 0)  # declared, never used
        m = await self.wait_metric("event_router_ordering_held_events", 0.0, queue=q)
        self.assertEqual(value(m, "event_router_ordering_waiting_events", queue=q), 0.0)
        self.assertIsNone(value(m, "event_router_retries_total", queue=q, reason="handler_failed"))

    async def test_a_dead_lettered_head_lets_its_aggregate_move_on(self):
        retry = {"max_attempts": 2, "delay": "300ms", "multiplier": 1, "max_delay": "300ms"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry)
        await self.start_daemon(self.write_config(self.config([queue])))
        head = self.event("A", 0, fail_attempts=99)
        tail = [self.event("A", s) for s in (1, 2)]
        for seq, ev in enumerate([head] + tail):
            self.by_id[ev["event_id"]] = ("A", seq)
            await self.publish(ev)
        self.dead_lettered = {"A": {0}}
        await self.wait_done(4)
        starts = self.assert_in_order(self.all_records(), expect_repeats=True)
        self.assertEqual(starts["A"], [0, 0, 1, 2])
        dead = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0].json()["event_id"], head["event_id"])
        self.assertEqual(dead[0].headers["x-death-reason"], "max_attempts")
        self.assertEqual(int(dead[0].headers["x-attempts"]), 2)
        # The dead letter was confirmed before the next event of A started.
        log = self.all_records()
        first_tail = next(i for i, r in enumerate(log) if r["phase"] == "start" and r["event_id"] == tail[0]["event_id"])
        last_head = max(i for i, r in enumerate(log) if r["event_id"] == head["event_id"])
        self.assertLess(last_head, first_tail)

    async def test_a_hold_past_ordering_hold_max_is_dead_lettered(self):
        retry = {"max_attempts": 5, "delay": "3s", "multiplier": 1, "max_delay": "3s"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry, ordering_hold_max="2s")
        d = await self.start_daemon(self.write_config(self.config([queue])))
        head, nxt = self.event("A", 0, fail_attempts=99), self.event("A", 1)
        for seq, ev in enumerate((head, nxt)):
            self.by_id[ev["event_id"]] = ("A", seq)
            await self.publish(ev)
        self.dead_lettered = {"A": {0}}
        await self.wait_done(2)
        starts = self.assert_in_order(self.all_records())
        self.assertEqual(starts["A"], [0, 1])
        dead = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual(dead[0].headers["x-death-reason"], "ordering_hold_exceeded")
        self.assertIn("ordering_hold_max", dead[0].headers["x-death-detail"])
        self.assertEqual(int(dead[0].headers["x-attempts"]), 1)
        self.assertTrue(d.records("dead-lettering", reason="ordering_hold_exceeded"))

    async def test_a_copy_of_a_held_event_waits_for_it_with_dedupe(self):
        # With dedupe on, a second copy of the held head (same event_id, as a
        # redelivery would be) waits for the head's outcome: after the head
        # succeeds in place it is a duplicate, never run, and the aggregate's
        # next event still runs after the head.
        retry = {"max_attempts": 3, "delay": "3s", "multiplier": 1, "max_delay": "3s"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry, dedupe={"ttl": "1h"})
        d = await self.start_daemon(self.write_config(self.config([queue])))
        head, nxt = self.event("A", 0, fail_attempts=1), self.event("A", 1)
        for seq, ev in enumerate((head, nxt)):
            self.by_id[ev["event_id"]] = ("A", seq)
            await self.publish(ev)
        await d.wait_for_record("retrying in place")
        await self.publish(head)  # the copy, while the head is held
        await self.wait_done(3)
        await self.wait_queue_counts(q, ready=0, unacked=0)
        recs = self.all_records()
        starts = self.assert_in_order(recs, expect_repeats=True)
        self.assertEqual(starts["A"], [0, 0, 1])
        self.assertEqual([r["attempt"] for r in recs if r["phase"] == "start" and r["event_id"] == head["event_id"]],
                         [1, 2])

    async def test_held_events_keep_their_generation_across_a_reload(self):
        # The head is held when a reload changes the handler: its next attempt
        # and the event that was already waiting behind it run on the handler
        # they were delivered to; an event delivered after the reload runs on
        # the new one, still after them.
        retry = {"max_attempts": 3, "delay": "8s", "multiplier": 1, "max_delay": "8s"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry)
        queue["handlers"][0]["exec"].append("--gen1")
        path = self.write_config(self.config([queue]))
        d = await self.start_daemon(path)
        head, waiting, late = self.event("A", 0, fail_attempts=1), self.event("A", 1), self.event("A", 2)
        for seq, ev in enumerate((head, waiting, late)):
            self.by_id[ev["event_id"]] = ("A", seq)
        await self.publish(head)
        await self.publish(waiting)
        await d.wait_for_record("retrying in place")
        queue["handlers"][0]["exec"][-1] = "--gen2"
        self.write_config(self.config([queue]), os.path.basename(path) + ".new")
        os.replace(path + ".new", path)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record("reloaded")
        await self.publish(late)
        await self.wait_done(4)
        recs = self.all_records()
        self.assertEqual(self.assert_in_order(recs, expect_repeats=True)["A"], [0, 0, 1, 2])
        gens = [(self.seq_of(r), r["attempt"], r["argv"][-1]) for r in recs if r["phase"] == "start"]
        self.assertEqual(gens, [(0, 1, "--gen1"), (0, 2, "--gen1"), (1, 1, "--gen1"), (2, 1, "--gen2")])
        # The reload really came while the head was held (the daemon's own log order).
        msgs = [(r.msg, r.fields.get("event_id"), r.fields.get("outcome")) for r in d.records()]
        self.assertLess(msgs.index(("reloaded", None, None)), msgs.index(("handled", head["event_id"], "ack")))

    async def test_order_holds_across_a_lost_connection(self):
        # The broker closes the daemon's connection while A's head is held for
        # a retry and B's head is still running: everything unacked comes
        # back. A's head runs again (attempt 1: the broker has no count of
        # attempts made in place) before A's later events; B's redelivered
        # head waits until its cut-off run has ended. (Hold and run are long
        # enough for rabbitmqctl to close the connection in between.)
        retry = {"max_attempts": 3, "delay": "10s", "multiplier": 1, "max_delay": "10s"}
        q, queue = self.ordered_queue(prefetch=10, concurrency=4, retry=retry)
        d = await self.start_daemon(self.write_config(self.config([queue])))
        ports = local_tcp_ports(d.pid)
        out = await asyncio.to_thread(run_rabbitmqctl, "list_connections", "-q", "pid", "peer_port")
        conns = [p[0] for p in (line.split("\t") for line in out.splitlines())
                 if len(p) == 2 and p[1].isdigit() and int(p[1]) in ports]
        self.assertTrue(conns, out)
        evs = [self.event("B", 0, sleep=10), self.event("B", 1),
               self.event("A", 0, fail_attempts=1), self.event("A", 1), self.event("A", 2)]
        for ev in evs:
            self.by_id[ev["event_id"]] = (ev["aggregate_id"], ev["payload"]["seq"])
            await self.publish(ev)
        await d.wait_for_record("retrying in place")
        for c in conns:
            await asyncio.to_thread(run_rabbitmqctl, "close_connection", c, "ordering test")
        await d.wait_for_record("connection lost")
        # The cut came while A's head was held and B's head ran.
        done = self.read_records(self.rec, "done")
        self.assertEqual([r["aggregate_id"] for r in done if r["aggregate_id"] == "B"], [])
        self.assertEqual([(r["aggregate_id"], r["exit"]) for r in done][:1], [("A", 75)])
        self.assertNotIn(("A", 0), [(r["aggregate_id"], r["exit"]) for r in done])
        await self.wait_done(8)
        await self.wait_queue_counts(q, ready=0, unacked=0)
        recs = self.all_records()
        starts = self.assert_in_order(recs, expect_repeats=True)
        self.assertEqual(starts["A"], [0, 0, 0, 1, 2])
        self.assertEqual(starts["B"], [0, 0, 1])
        head = evs[2]["event_id"]
        self.assertEqual([r["attempt"] for r in recs if r["phase"] == "start" and r["event_id"] == head], [1, 1, 2])

    async def test_order_holds_across_sigterm_and_restart(self):
        # Many aggregates in flight, one of them with a head held for a long
        # retry when SIGTERM comes: the drain hands held and waiting events
        # back at once (no waiting for the hold), and after the restart every
        # aggregate still runs in publish order, nothing lost.
        rng = random.Random(3)
        retry = {"max_attempts": 5, "delay": "60s", "multiplier": 1, "max_delay": "60s"}
        q, queue = self.ordered_queue(prefetch=30, concurrency=4, retry=retry)
        cfg = self.write_config(self.config([queue]))
        d = await self.start_daemon(cfg)
        aggs = ["agg-%d" % i for i in range(8)]
        await self.publish_interleaved(aggs, 8, rng,
                                       payload=lambda a, s: {"fail_attempts": 1} if (a, s) == ("agg-0", 2) else {})
        # Until agg-0's third event has failed once (it is then held for 60 s)
        # and a good part of the rest has run.
        deadline = time.monotonic() + 60
        while True:
            recs = self.all_records()
            held = any(r["phase"] == "done" and r["exit"] != 0 for r in recs)
            done = sum(1 for r in recs if r["phase"] == "done")
            if held and done >= 20:
                break
            self.assertLess(time.monotonic(), deadline, "no held head yet" + self._daemon_tail())
            await asyncio.sleep(0.05)
        stop_at = time.monotonic()
        d.send_signal(signal.SIGTERM)
        rc = await d.wait_exit(timeout=40)
        self.assertEqual(rc, 0)
        # The 60 s hold did not keep the daemon: it exits once running handlers end.
        self.assertLess(time.monotonic() - stop_at, 30)
        self.assertTrue(d.records("stopped"))
        before = len(self.read_records(self.rec, "done"))
        self.assertLess(before, 64, "everything ran before the restart: the test proves nothing")
        d2 = await self.start_daemon(cfg)
        # agg-0's third event fails its first attempt again after the restart
        # (the broker keeps no count of attempts made in place) and is held
        # for 60 s: wait for everything else, then check nothing ran behind it.
        await self.wait_done(64 - 6, successes=True, timeout=90)
        recs = self.all_records()
        starts = self.assert_in_order(recs, expect_repeats=True)
        for a in aggs[1:]:
            self.assertEqual(sorted(set(starts[a])), list(range(8)), a)
        self.assertEqual(starts["agg-0"], [0, 1, 2, 2])
        runs_of_held = [r["attempt"] for r in recs if r["phase"] == "start" and r["aggregate_id"] == "agg-0"
                        and self.seq_of(r) == 2]
        self.assertEqual(runs_of_held, [1, 1])
        info = await self.queue_info(q)
        self.assertEqual(info["messages_unacknowledged"], 6, info)  # the held head and the five behind it
        self.assertEqual(info["messages_ready"], 0, info)
        self.assertIsNotNone(d2.pid)

    async def test_aggregates_run_side_by_side(self):
        # Four aggregates and three events without an aggregate id, each run
        # long enough to overlap: from the handlers' own lines, runs of
        # different aggregates (and of unordered events) are in progress at
        # the same moment, while no aggregate ever has two.
        q, queue = self.ordered_queue(prefetch=20, concurrency=8)
        await self.start_daemon(self.write_config(self.config([queue])))
        for seq in range(3):
            for a in ("A", "B", "C", "D"):
                ev = self.event(a, seq, sleep=0.4)
                self.by_id[ev["event_id"]] = (a, seq)
                await self.publish(ev)
        loose = []
        for i in range(3):
            ev = self.make_event("o.changed", {"sleep": 0.6})
            del ev["aggregate_id"]
            self.by_id[ev["event_id"]] = (None, i)
            loose.append(ev)
            await self.publish(ev)
        await self.wait_done(15)
        recs = self.all_records()
        most_aggs, most_loose = 0, 0
        for r, running in runs_by_line(recs):
            aggs = [o["aggregate_id"] for o in running.values() if o["aggregate_id"]]
            self.assertEqual(len(aggs), len(set(aggs)), "two runs of one aggregate at once: %r" % aggs)
            most_aggs = max(most_aggs, len(set(aggs)))
            most_loose = max(most_loose, sum(1 for o in running.values() if not o["aggregate_id"]))
        self.assertGreaterEqual(most_aggs, 2, "no two aggregates ever ran at the same time")
        self.assertGreaterEqual(most_loose, 2, "events without an aggregate id were serialised")
        self.assert_in_order([r for r in recs if r.get("aggregate_id")])


if __name__ == "__main__":
    import unittest
    unittest.main()
