"""Several daemon instances with one config on the same queues (issue 13, part 3).

Every test runs two daemons on the same config file, each with its own
state_dir and an INSTANCE name it passes to the recording handler
(`inherit_env`), so each handler record says which instance ran it.

1. Competing instances (no single active consumer): one is SIGKILLed mid-flow;
   every event is handled, and only events it had in flight run again (at most
   its prefetch).
2. A retry copy published by instance A (signed with the shared copy key) is
   verified by instance B, which runs it as attempt 2.
3. `single_active_consumer: true`: only one instance runs events; the other
   takes over when the first is SIGKILLed or SIGTERMed, and per-aggregate order
   (`ordering: aggregate`) holds across both. On SIGTERM the stopping instance
   settles its in-flight events (acks, a dead letter) before the other gets
   anything. Takeover times are printed (TAKEOVER lines), not asserted.
4. A reload that changes the prefetch of a single-active-consumer queue keeps
   the active consumer (same consumer tag, still the active one) and applies
   the new prefetch (more events run at once afterwards).
"""
import asyncio
import os
import secrets
import signal
import time
import unittest
from collections import defaultdict
from typing import Any, Dict, List

from harness import AMQP_URL, RECORD_HANDLER, RouterTestCase, rabbitmqctl_json, run_check


class InstancesTest(RouterTestCase):

    # -- setup -------------------------------------------------------------------

    def shared_key(self) -> str:
        path = os.path.join(self.tmp, "copy.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_bytes(32))
        os.close(fd)
        return path

    def instances_config(self, queue: Dict[str, Any], record: str, sleep: float = 0.0) -> str:
        """One config for every instance: state_dir from $STATE_DIR, the copy
        key shared, the handler told which instance runs it."""
        args = ["--done"] + (["--sleep", str(sleep)] if sleep else [])
        handler = {"name": "rec", "events": ["#"], "exec": [RECORD_HANDLER, record, *args],
                   "inherit_env": ["INSTANCE"]}
        q = dict(queue, bindings=["inst.*"], handlers=[handler])
        cfg = self.config([q], state_dir="${STATE_DIR}",
                          security={"copy_key_file": self.shared_key()},
                          broker={"url": AMQP_URL, "heartbeat": "30s",
                                  "reconnect": {"initial": "200ms", "max": "1s"}})
        return self.write_config(cfg)

    async def start_instance(self, path: str, name: str, wait_ready: bool = True):
        state = os.path.join(self.tmp, "state-" + name)
        return await self.start_daemon(path, env={"INSTANCE": name, "STATE_DIR": state}, wait_ready=wait_ready)

    @staticmethod
    def who(r: Dict[str, Any]) -> str:
        return r["env"].get("INSTANCE", "?")

    async def consumers(self, queue: str) -> List[Dict[str, Any]]:
        for attempt in range(5):
            try:
                rows = await asyncio.to_thread(rabbitmqctl_json, "list_consumers", "-p", "/", "queue_name",
                                               "consumer_tag", "active", "channel_pid")
                return [r for r in rows if r.get("queue_name") == queue]
            except RuntimeError:
                # Another test's channel closing mid-listing fails the whole command.
                if attempt == 4:
                    raise
                await asyncio.sleep(0.3)
        return []

    async def wait_consumers(self, queue: str, n: int, timeout: float = 20.0) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.consumers(queue)
            if len(rows) == n:
                return rows
            if time.monotonic() > deadline:
                self.fail("queue %s: wanted %d consumers, have %r" % (queue, n, rows))
            await asyncio.sleep(0.2)

    async def wait_all_done(self, record: str, ids, timeout: float = 90.0) -> List[Dict[str, Any]]:
        """Until every event id has a successful run (a `done` line with exit 0)."""
        deadline = time.monotonic() + timeout
        want = set(ids)
        while True:
            ok = {r["event_id"] for r in self.read_records(record, "done") if r.get("exit") == 0}
            if want <= ok:
                return self.read_records(record, None)
            if time.monotonic() > deadline:
                self.fail("%d of %d events never succeeded%s" % (len(want - ok), len(want), self._daemon_tail()))
            await asyncio.sleep(0.1)

    def ordered_events(self, aggregates: int, per: int, **payload: Any) -> List[Dict[str, Any]]:
        """`per` events for each of `aggregates` aggregates, interleaved; payload.seq numbers each aggregate's."""
        aggs = ["agg-%d-%s" % (i, secrets.token_hex(3)) for i in range(aggregates)]
        return [self.make_event("inst.changed", dict(payload, seq=s), aggregate_id=a)
                for s in range(1, per + 1) for a in aggs]

    def seq_of(self, events: List[Dict[str, Any]]) -> Dict[str, int]:
        return {e["event_id"]: e["payload"]["seq"] for e in events}

    # -- 1: competing instances, one SIGKILLed -------------------------------------

    async def test_competing_instances_sigkill_loses_nothing_and_reruns_only_in_flight(self):
        q = self.queue_name("work")
        record = self.record_file("runs")
        prefetch = 5
        path = self.instances_config({"name": q, "prefetch": prefetch}, record, sleep=0.15)
        a = await self.start_instance(path, "a")
        b = await self.start_instance(path, "b")
        await self.wait_consumers(q, 2)
        events = [self.make_event("inst.created", {"n": i}) for i in range(120)]
        for e in events:
            await self.publish(e)
        # Both take part before the kill.
        deadline = time.monotonic() + 60
        while True:
            runs = self.read_records(record)
            by = {self.who(r) for r in runs}
            if {"a", "b"} <= by and sum(1 for r in runs if self.who(r) == "a") >= 10:
                break
            if time.monotonic() > deadline:
                self.fail("both instances should run events; runs by %r%s" % (by, self._daemon_tail()))
            await asyncio.sleep(0.05)
        t_kill = time.time()
        a.kill()
        self.assertEqual(await a.wait_exit(10), -signal.SIGKILL)
        ids = [e["event_id"] for e in events]
        await self.wait_all_done(record, ids)
        await self.wait_queue_counts(q, 0, 0, timeout=30)
        await b.stop()

        starts = self.read_records(record)
        # A handler a forked just before the kill can start with its input cut
        # and record no id: allowed for a only; every id must still run below.
        torn = [r for r in starts if r.get("event_id") is None]
        self.assertEqual({self.who(r) for r in torn} - {"a"}, set(), torn)
        per_id = defaultdict(list)
        for r in starts:
            if r.get("event_id") is not None:
                per_id[r["event_id"]].append(r)
        again = {i: rs for i, rs in per_id.items() if len(rs) > 1}
        # What ran twice: started by a (its handler process forked before the
        # kill may write its line just after it), run again by b after the kill.
        for i, rs in again.items():
            self.assertEqual(len(rs), 2, "event %s ran %d times" % (i, len(rs)))
            first, second = sorted(rs, key=lambda r: r["time"])
            self.assertEqual((self.who(first), self.who(second)), ("a", "b"))
            self.assertGreater(second["time"], t_kill)
        # ...and only events a had in flight (started, not acked): at most its prefetch.
        self.assertLessEqual(len(again), prefetch)
        self.assertEqual(set(per_id), set(ids))
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        print("\nCOMPETING sigkill: %d events, %d run by a, %d by b, %d run again (prefetch %d)"
              % (len(ids), sum(1 for r in starts if self.who(r) == "a"),
                 sum(1 for r in starts if self.who(r) == "b"), len(again), prefetch))

    # -- 2: a retry copy made by one instance, counted by another ------------------

    async def test_retry_copy_from_one_instance_is_attempt_two_on_another(self):
        q = self.queue_name("work")
        record = self.record_file("runs")
        path = self.instances_config({"name": q, "retry": {"max_attempts": 3, "delay": "1s"}}, record)
        a = await self.start_instance(path, "a")
        ev = self.make_event("inst.created", {"fail_attempts": 1})
        await self.publish(ev)
        first = (await self.wait_records(record, 1))[0]
        self.assertEqual((self.who(first), first["attempt"]), ("a", 1))
        await a.wait_for_record("handled", event_id=ev["event_id"], outcome="retry")
        # The drain settles the retry: its copy is confirmed before a exits.
        self.assertEqual(await a.stop(), 0)
        b = await self.start_instance(path, "b")
        runs = await self.wait_records(record, 2)
        second = runs[1]
        self.assertEqual(second["event_id"], ev["event_id"])
        self.assertEqual(self.who(second), "b")
        # b verified a's signature: the copy is attempt 2, not a first delivery.
        self.assertEqual(second["attempt"], 2)
        self.assertEqual(second["env"].get("ATTEMPT"), "2")
        await b.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(len(self.read_records(record)), 2)
        await b.stop()

    # -- 3: single active consumer: takeover on SIGKILL and SIGTERM ---------------

    def sac_queue(self, q: str, prefetch: int = 10) -> Dict[str, Any]:
        return {"name": q, "prefetch": prefetch, "single_active_consumer": True, "ordering": "aggregate"}

    async def start_pair(self, path: str, q: str):
        a = await self.start_instance(path, "a")
        await self.wait_consumers(q, 1)  # a registers first: a is the active one
        b = await self.start_instance(path, "b")
        rows = await self.wait_consumers(q, 2)
        self.assertEqual(sorted(r["active"] for r in rows), [False, True], rows)
        return a, b

    def check_order(self, runs: List[Dict[str, Any]], seq: Dict[str, int]) -> Dict[str, List[int]]:
        """Per aggregate: each instance started its events in order, one at a
        time, and b began at or before the one after a's last finished run (a
        re-run, never a gap). Returns the seq numbers a then b started."""
        per_agg = defaultdict(lambda: {"a": [], "b": [], "done_a": 0})
        pid_of = {r["pid"]: self.who(r) for r in runs if r["phase"] == "start"}
        for r in sorted(runs, key=lambda r: r["time"]):
            if r["phase"] == "start":
                per_agg[r["aggregate_id"]][self.who(r)].append(seq[r["event_id"]])
            elif pid_of.get(r["pid"]) == "a":
                p = per_agg[r["aggregate_id"]]
                p["done_a"] = max(p["done_a"], seq[r["event_id"]])
        for agg, p in per_agg.items():
            for inst in ("a", "b"):
                self.assertEqual(p[inst], sorted(set(p[inst])), "%s on %s: %r" % (agg, inst, p))
            if p["b"]:
                self.assertLessEqual(p["b"][0], p["done_a"] + 1, "%s: b skipped events: %r" % (agg, p))
            if p["a"]:
                self.assertEqual(p["a"][0], 1, "%s: %r" % (agg, p))
        return {agg: p["a"] + p["b"] for agg, p in per_agg.items()}

    async def test_single_active_consumer_sigkill_takeover_keeps_aggregate_order(self):
        q = self.queue_name("work")
        record = self.record_file("runs")
        path = self.instances_config(self.sac_queue(q), record, sleep=0.1)
        a, b = await self.start_pair(path, q)
        events = self.ordered_events(aggregates=4, per=15)
        for e in events:
            await self.publish(e)
        await self.wait_records(record, 20)
        t_kill = time.time()
        a.kill()
        ids = [e["event_id"] for e in events]
        await self.wait_all_done(record, ids)
        await self.wait_queue_counts(q, 0, 0, timeout=30)
        await b.stop()

        runs = self.read_records(record, None)
        starts = [r for r in runs if r["phase"] == "start"]
        # (A handler a started just before the kill may write its line after it.)
        self.assertGreater(min(r["time"] for r in starts if self.who(r) == "b"), t_kill, "b ran while a was active")
        seqs = self.check_order(runs, self.seq_of(events))
        # Every aggregate completes; the only repeats are events a had running
        # when it died (requeued to b ahead of the aggregate's later events).
        again = len(starts) - len(ids)
        self.assertLessEqual(again, 10)
        for agg, s in seqs.items():
            self.assertEqual(sorted(set(s)), list(range(1, 16)), agg)
        takeover = min(r["time"] for r in starts if self.who(r) == "b") - t_kill
        print("\nTAKEOVER sigkill: %.3f s from SIGKILL to b's first event start; %d run again" % (takeover, again))
        self.assertLess(takeover, 30)

    async def test_single_active_consumer_sigterm_settles_before_handover(self):
        q = self.queue_name("work")
        record = self.record_file("runs")
        path = self.instances_config(self.sac_queue(q), record)
        a, b = await self.start_pair(path, q)
        # Four aggregates of slow events, one dead-lettered on the way: a has
        # four running (one per aggregate) and the rest waiting when it stops.
        events = self.ordered_events(aggregates=4, per=6, sleep=1.0)
        events[1]["payload"]["exit_code"] = 65  # the second aggregate's first: a dead letter
        dead = events[1]["event_id"]
        for e in events:
            await self.publish(e)
        await self.wait_records(record, 6)
        t_term = time.time()
        a.send_signal(signal.SIGTERM)
        self.assertEqual(await a.wait_exit(30), 0)
        ids = [e["event_id"] for e in events]
        await self.wait_all_done(record, [i for i in ids if i != dead])
        await self.wait_queue_counts(q, 0, 0, timeout=30)
        await b.stop()

        runs = self.read_records(record, None)
        starts = [r for r in runs if r["phase"] == "start"]
        # Nothing ran twice: a finished and settled what it had started.
        self.assertEqual(sorted(r["event_id"] for r in starts), sorted(ids))
        by_a = [r for r in starts if self.who(r) == "a"]
        by_b = [r for r in starts if self.who(r) == "b"]
        self.assertTrue(by_a and by_b, "both instances should have run events")
        done_a = max(r["time"] for r in runs if r["phase"] == "done" and r["event_id"] in {x["event_id"] for x in by_a})
        first_b = min(r["time"] for r in by_b)
        # b got nothing until a's last event was done (and settled: see the log order below).
        self.assertGreater(first_b, done_a)
        log = a.log()
        let_go = log.find("letting go of a single-active-consumer queue")
        self.assertGreater(let_go, 0, a.tail())
        for e in by_a:
            handled = log.find("event_id=" + e["event_id"])
            self.assertGreater(handled, 0)
            self.assertLess(handled, let_go, "an event was settled after a let go of the queue")
        self.check_order(runs, self.seq_of(events))
        # The dead letter went out (confirmed) from a, before the hand-over.
        self.assertIn(dead, {r["event_id"] for r in by_a})
        dlq = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual(len(dlq), 1)
        print("\nTAKEOVER sigterm: %.3f s from SIGTERM to b's first event start, %.3f s after a's last"
              " event was done (a ran %d, b %d)" % (first_b - t_term, first_b - done_a, len(by_a), len(by_b)))
        self.assertLess(first_b - t_term, 30)

    # -- 4: a reload that changes the prefetch keeps the active role --------------

    async def test_single_active_consumer_reload_prefetch_in_place(self):
        q = self.queue_name("work")
        record = self.record_file("runs")
        queue = {"name": q, "prefetch": 2, "single_active_consumer": True}
        path = self.instances_config(queue, record, sleep=0.4)
        p = await asyncio.to_thread(run_check, path, self.daemon_env({"STATE_DIR": os.path.join(self.tmp, "chk")}))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("queue %s (durable) prefetch 2" % q, p.stdout)
        self.assertIn("single-active-consumer", p.stdout)
        a, b = await self.start_pair(path, q)
        # The key is declared as the broker's argument.
        args = (await self.queue_info(q))["arguments"]
        args = {x[0]: x[-1] for x in args} if isinstance(args, list) else dict(args or {})
        self.assertEqual(args.get("x-single-active-consumer"), True)
        active = [r["consumer_tag"] for r in await self.consumers(q) if r["active"]]
        events = [self.make_event("inst.created", {"n": i}) for i in range(40)]
        for e in events:
            await self.publish(e)
        await self.wait_records(record, 6)
        # The same file for both (b reads it at its next reload or start only).
        with open(path) as f:
            text = f.read()
        self.assertIn("prefetch: 2", text)
        before = len(a.records("reloaded"))
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write(text.replace("prefetch: 2", "prefetch: 6"))
        os.replace(tmp, path)
        t_reload = time.time()
        a.send_signal(signal.SIGHUP)
        await a.wait_for_record("reloaded", count=before + 1)
        rows = await self.consumers(q)
        self.assertEqual([r["consumer_tag"] for r in rows if r["active"]], active, rows)
        await self.wait_all_done(record, [e["event_id"] for e in events])
        rows = await self.consumers(q)
        self.assertEqual([r["consumer_tag"] for r in rows if r["active"]], active, rows)
        await a.stop()
        await b.stop()

        runs = self.read_records(record, None)
        self.assertEqual({self.who(r) for r in runs if r["phase"] == "start"}, {"a"})

        def most_at_once(after: bool) -> int:
            edges = []
            for r in runs:
                if (r["time"] > t_reload) == after:
                    edges.append((r["time"], 1 if r["phase"] == "start" else -1))
            n = top = 0
            for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
                n += d
                top = max(top, n)
            return top
        self.assertLessEqual(most_at_once(False), 2)
        # Up to 6 at once after the reload: the broker let more out on the kept consumer.
        self.assertGreater(most_at_once(True), 2)
        self.assertNotIn("stopped a replaced consumer", a.log())
        self.assertEqual(len(a.records("prefetch changed in place", queue=q, prefetch="6")), 1)


if __name__ == "__main__":
    unittest.main()
