"""Crash-loop protection (docs/reliability.md#crash-loop-protection): an event
whose plugin kills the whole daemon is dead-lettered with reason
`crash_loop` after `crash_loop.max_crashes` unclean exits, instead of taking
the daemon down forever.

The plugin is tests/plugins/crash_plugin.c (built into <build>/test-plugins):
it abort()s (or segfaults) on an event whose payload says "poison", and
records `start`/`done` lines for the others, which it runs on the worker
threads, several at once. Each test restarts the daemon after every crash,
as systemd's Restart=on-failure would.

On a quorum queue the broker's own `x-delivery-limit` does the same job; that
test declares the queue through `arguments:` (with a dead-letter route into
the DLQ) and switches the router's guard off, so the broker alone acts.
"""
import asyncio
import os
import signal
import time
import unittest

from harness import BUILD_DIR, RouterTestCase

CRASH_PLUGIN = os.path.join(BUILD_DIR, "test-plugins", "crash_plugin.so")
# A sanitizer build turns a segfault into a report, which fails any test.
SANITIZED = bool(os.environ.get("ASAN_OPTIONS"))


class CrashLoopTest(RouterTestCase):
    def setUp(self):
        if not os.path.exists(CRASH_PLUGIN):
            raise AssertionError("test plugin not built: %s (make er_unit_tests)" % CRASH_PLUGIN)

    def make_config(self, queue_extra=None, sleep_us=300000, extra_queues=(), **top):
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.rec = os.path.join(self.tmp, "crash.log")  # the plugin's lines, not JSON
        queue = {"name": self.q, "bindings": ["cl.*"], "prefetch": 10,
                 "retry": {"max_attempts": 1},
                 "handlers": [{"name": "crashy", "events": ["cl.*"], "plugin": CRASH_PLUGIN,
                               "config": {"file": self.rec, "sleep_us": sleep_us}, "concurrency": 4}]}
        queue.update(queue_extra or {})
        top.setdefault("plugin_threads", 4)
        top.setdefault("shutdown_timeout", "10s")
        return self.write_config(self.config([queue, *extra_queues], **top))

    def lines(self, kind, event_id=None):
        """The plugin's `kind` lines ("start" or "done"): [(event_id, pid)]."""
        out = []
        if not os.path.exists(self.rec):
            return out
        with open(self.rec) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == kind and (event_id is None or parts[1] == event_id):
                    out.append((parts[1], int(parts[2])))
        return out

    async def run_until(self, d, path, done, max_runs=8, timeout=120.0):
        """Restarts the daemon `d` after each exit (like systemd), until
        `done()` holds. Returns (exit statuses of the runs that ended, the
        daemon still running)."""
        statuses = []
        deadline = time.monotonic() + timeout
        while True:
            if await done():
                return statuses, d
            rc = d.poll()
            if rc is not None:
                statuses.append(rc)
                if len(statuses) >= max_runs:
                    self.fail("the daemon exited %d times: %r\n%s" % (len(statuses), statuses, d.tail()))
                d = await self.start_daemon(path, wait_ready=False)
            if time.monotonic() > deadline:
                self.fail("not done after %.0fs; exits %r; queue %r; dlq %r; done %d\n%s"
                          % (timeout, statuses, await self.queue_info(self.q), await self.message_count(self.dlq),
                             len(self.lines("done")), d.tail()))
            await asyncio.sleep(0.05)

    async def publish_mix(self, path, before=6, after=6, poison="abort", **poison_payload):
        """Starts the daemon on `path` (it declares the topology), publishes
        `before` ordinary events, the poison one, `after` more. Returns the
        daemon, the ordinary events and the poison one."""
        d = await self.start_daemon(path)
        ordinary = [self.make_event("cl.ok", {"n": i}) for i in range(before + after)]
        bad = self.make_event("cl.bad", {"poison": poison, **poison_payload})
        for ev in ordinary[:before]:
            await self.publish(ev)
        await self.publish(bad)
        for ev in ordinary[before:]:
            await self.publish(ev)
        return d, ordinary, bad

    def all_done(self, events):
        done = {e for e, _ in self.lines("done")}
        return all(ev["event_id"] in done for ev in events)

    async def assert_settled(self, ordinary, bad, reason, detail_has):
        """The poison event alone in the DLQ with `reason`; every ordinary one
        done at least once and none in the DLQ; the queue empty."""
        letters = await self.get_all(self.dlq, expect=1)
        self.assertEqual([m.json()["event_id"] for m in letters], [bad["event_id"]])
        h = letters[0].headers
        if reason == "delivery_limit":  # the broker's dead letter: its x-death, none of ours
            self.assertEqual(h["x-death"][0]["reason"], "delivery_limit", h)
            self.assertNotIn("x-death-reason", h)
        else:
            self.assertEqual(h.get("x-death-reason"), reason, h)
            self.assertIn(detail_has, h.get("x-death-detail", ""), h)
            self.assertEqual(h.get("x-original-queue"), self.q, h)
        self.assertTrue(self.all_done(ordinary), "not every ordinary event was handled")
        await self.wait_queue_counts(self.q, 0, 0)

    # -- classic queues: the router's guard -------------------------------------

    async def test_poison_dead_lettered_after_three_crashes(self):
        path = self.make_config()  # the default: max_crashes 3
        d, ordinary, bad = await self.publish_mix(path)

        async def done():
            return await self.message_count(self.dlq) == 1 and self.all_done(ordinary)

        statuses, d = await self.run_until(d, path, done)
        # Three unclean exits, each by the plugin's abort(); the fourth run
        # dead-letters the event without running it.
        self.assertEqual(statuses, [-signal.SIGABRT] * 3, d.tail())
        self.assertEqual(len(self.lines("start", bad["event_id"])), 3)
        self.assertEqual(len({pid for _, pid in self.lines("start", bad["event_id"])}), 3)
        rec = await d.wait_for_record("dead-lettering an event the daemon keeps dying on (crash_loop)")
        self.assertEqual(rec[0].fields.get("event_id"), bad["event_id"])
        self.assertEqual(rec[0].fields.get("crashes"), "3")
        # The abort named its event: the ordinary events that ran beside it
        # (four at a time, 300 ms each) were not blamed.
        prev = d.records("the previous run ended uncleanly")
        self.assertEqual(len(prev), 1, d.tail())
        self.assertEqual(prev[0].fields.get("events"), "1")
        self.assertEqual(prev[0].fields.get("signal"), str(int(signal.SIGABRT)))
        await self.assert_settled(ordinary, bad, "crash_loop", "3 times")
        # Events published after the dead-lettering are handled too.
        late = [self.make_event("cl.ok", {"late": i}) for i in range(3)]
        for ev in late:
            await self.publish(ev)
        deadline = time.monotonic() + 20
        while not self.all_done(late) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertTrue(self.all_done(late))
        self.assertEqual(await d.stop(), 0)

    async def test_limit_is_configurable_per_queue(self):
        path = self.make_config({"crash_loop": {"max_crashes": 1}}, crash_loop={"max_crashes": 5})
        d, ordinary, bad = await self.publish_mix(path, before=3, after=3)

        async def done():
            return await self.message_count(self.dlq) == 1 and self.all_done(ordinary)

        statuses, d = await self.run_until(d, path, done)
        self.assertEqual(statuses, [-signal.SIGABRT], d.tail())
        await self.assert_settled(ordinary, bad, "crash_loop", "uncleanly once while")
        self.assertEqual(await d.stop(), 0)

    @unittest.skipIf(SANITIZED, "a segfault under AddressSanitizer is a report, which fails the test")
    async def test_segfault(self):
        path = self.make_config(crash_loop={"max_crashes": 2})
        d, ordinary, bad = await self.publish_mix(path, before=4, after=4, poison="segv")

        async def done():
            return await self.message_count(self.dlq) == 1 and self.all_done(ordinary)

        statuses, d = await self.run_until(d, path, done)
        self.assertEqual(statuses, [-signal.SIGSEGV] * 2, d.tail())
        await self.assert_settled(ordinary, bad, "crash_loop", "last: SIGSEGV in its handler")
        self.assertEqual(await d.stop(), 0)

    async def test_zero_disables(self):
        path = self.make_config(crash_loop={"max_crashes": 0})
        d, ordinary, bad = await self.publish_mix(path, before=2, after=2)
        runs = []
        while len(runs) < 4:
            rc = await d.wait_exit(60)
            self.assertEqual(rc, -signal.SIGABRT, d.tail())
            runs.append(rc)
            if len(runs) < 4:
                d = await self.start_daemon(path, wait_ready=False)
        # Four crashes and still no dead letter: the event is back in the queue.
        self.assertEqual(await self.message_count(self.dlq), 0)
        self.assertEqual(len(self.lines("start", bad["event_id"])), 4)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "state", "inflight")))
        self.assertEqual(d.records("the previous run ended uncleanly"), [])

    async def test_sigterm_is_a_clean_exit(self):
        # max_crashes 1: if a SIGTERM counted, the slow event would be dead-
        # lettered on the first restart. shutdown_timeout 300ms abandons it
        # while it runs, so each restart gets it redelivered.
        path = self.make_config(crash_loop={"max_crashes": 1}, shutdown_timeout="300ms")
        slow = self.make_event("cl.slow", {"sleep_ms": 1500})
        d = await self.start_daemon(path)
        await self.publish(slow)
        for run in range(3):
            if run:
                d = await self.start_daemon(path, wait_ready=False)
            deadline = time.monotonic() + 20
            while len(self.lines("start", slow["event_id"])) <= run:
                self.assertLess(time.monotonic(), deadline, d.tail())
                await asyncio.sleep(0.05)
            self.assertEqual(await d.stop(), 0)
            self.assertEqual(d.records("the previous run ended uncleanly"), [], d.tail())
        d = await self.start_daemon(path)
        deadline = time.monotonic() + 20
        while not self.lines("done", slow["event_id"]):
            self.assertLess(time.monotonic(), deadline, d.tail())
            await asyncio.sleep(0.05)
        self.assertEqual(d.records("the previous run ended uncleanly"), [])
        self.assertEqual(await self.message_count(self.dlq), 0)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await d.stop(), 0)

    async def test_sigkill_blames_every_active_plugin_event(self):
        # A SIGKILL (an operator, the OOM killer) names no event: every event
        # a plugin was running counts, here with max_crashes 1, so the slow
        # one is dead-lettered at the next start. An exec handler's event runs
        # in a process of its own, cannot take the daemon down, and does not
        # count: it runs again.
        ex_q = self.queue_name("exec")
        ex_rec = self.record_file("ex")
        ex = self.recorder("ex", ["ex.*"], record=ex_rec, args=["--done"])
        path = self.make_config(crash_loop={"max_crashes": 1},
                                extra_queues=[{"name": ex_q, "bindings": ["ex.*"], "handlers": [ex]}])
        d = await self.start_daemon(path)
        slow = self.make_event("cl.slow", {"sleep_ms": 5000})
        ext = self.make_event("ex.slow", {"sleep": 5})
        await self.publish(slow)
        await self.publish(ext)
        deadline = time.monotonic() + 20
        while not self.lines("start", slow["event_id"]):
            self.assertLess(time.monotonic(), deadline, d.tail())
            await asyncio.sleep(0.05)
        await self.wait_records(ex_rec, 1)
        d.kill()
        self.assertEqual(d.returncode, -signal.SIGKILL)
        d = await self.start_daemon(path)
        letters = await self.get_all(self.dlq, expect=1)
        self.assertEqual([m.json()["event_id"] for m in letters], [slow["event_id"]])
        self.assertEqual(letters[0].headers.get("x-death-reason"), "crash_loop")
        self.assertIn("no signal of its own", letters[0].headers.get("x-death-detail", ""))
        self.assertEqual(len(self.lines("start", slow["event_id"])), 1)  # not run again
        prev = d.records("the previous run ended uncleanly")
        self.assertEqual(prev[0].fields.get("events"), "1", d.tail())  # the plugin's, not the exec one's
        recs = await self.wait_records(ex_rec, 2)  # the exec event runs again
        self.assertEqual({r["event_id"] for r in recs}, {ext["event_id"]})
        await self.wait_queue_counts(ex_q, 0, 0, timeout=30)
        self.assertEqual(await self.message_count(ex_q + ".dlq"), 0)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await d.stop(), 0)

    # -- quorum queues: the broker's delivery limit ------------------------------

    def quorum_config(self, limit, prefetch):
        q = self.queue_name("quorum")
        args = {"x-queue-type": "quorum", "x-delivery-limit": limit,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + ".dlq"}
        h = {"name": "crashy", "events": ["cl.*"], "plugin": CRASH_PLUGIN,
             "config": {"file": os.path.join(self.tmp, "crash.log"), "sleep_us": 300000},
             "concurrency": min(prefetch, 4)}
        path = self.make_config({"name": q, "arguments": args, "prefetch": prefetch, "handlers": [h]},
                                crash_loop={"max_crashes": 0})
        self.q, self.dlq = q, q + ".dlq"
        return path

    async def test_quorum_delivery_limit(self):
        # prefetch 1: only the event being handled is unacked when it crashes,
        # so only it is returned to the queue, and only its count grows.
        limit = 2
        path = self.quorum_config(limit, prefetch=1)
        d, ordinary, bad = await self.publish_mix(path, before=3, after=3)

        async def done():
            return await self.message_count(self.dlq) == 1 and self.all_done(ordinary)

        statuses, d = await self.run_until(d, path, done)
        # Each crash returns the message to the queue, which counts as a
        # delivery: after limit + 1 deliveries the broker dead-letters it.
        self.assertEqual(statuses, [-signal.SIGABRT] * (limit + 1), d.tail())
        self.assertEqual(len(self.lines("start", bad["event_id"])), limit + 1)
        await self.assert_settled(ordinary, bad, "delivery_limit", "")
        self.assertEqual(await d.stop(), 0)

    async def test_quorum_delivery_limit_counts_prefetched_events_too(self):
        # prefetch 10: every event delivered and unacked at a crash is
        # returned and counted by the broker, run or not. Those behind the
        # poison event reach the limit with it and are dead-lettered by the
        # broker too (the router's guard, on the same flow, takes the poison
        # event alone: test_poison_dead_lettered_after_three_crashes). Nothing
        # is lost either way.
        limit = 2
        path = self.quorum_config(limit, prefetch=10)
        d, ordinary, bad = await self.publish_mix(path, before=2, after=6)
        ids = {ev["event_id"] for ev in ordinary}

        async def done():
            if await self.message_count(self.q) != 0:
                return False
            info = await self.queue_info(self.q)
            if info is None or info.get("messages_unacknowledged") != 0:
                return False
            dead = await self.message_count(self.dlq)
            handled = {e for e, _ in self.lines("done")} & ids
            return dead is not None and dead + len(handled) >= len(ids) + 1

        statuses, d = await self.run_until(d, path, done)
        self.assertEqual(statuses, [-signal.SIGABRT] * (limit + 1), d.tail())
        letters = await self.get_all(self.dlq)
        reasons = {m.headers["x-death"][0]["reason"] for m in letters}
        self.assertEqual(reasons, {"delivery_limit"})
        dead = [m.json()["event_id"] for m in letters]
        self.assertIn(bad["event_id"], dead)
        innocent = set(dead) - {bad["event_id"]}
        self.assertTrue(innocent, "no prefetched event was dead-lettered with the poison one")
        for e in innocent:  # never run to the end, or run and then returned before its ack
            self.assertIn(e, ids)
        handled = {e for e, _ in self.lines("done")} & ids
        self.assertEqual(handled | innocent, ids, "an event was lost")
        self.assertEqual(await d.stop(), 0)


if __name__ == "__main__":
    unittest.main()
