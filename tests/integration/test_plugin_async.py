"""Plugin ABI version 2 through the real broker: verdicts by asynchronous
completion from the plugin's own thread, many events pending at once on a
single plugin thread, the pending timeout, double completion, SIGTERM and
SIGHUP while events are pending.

The plugin is tests/plugins/async_plugin.c (built into <build>/test-plugins);
each event's payload tells it what to do (see the comment at its top).
Emits only reach Outcome.emits here (unit tests); publishing them is the
`emit` branch's."""
import asyncio
import os
import signal
import unittest

from harness import BUILD_DIR, RouterTestCase

ASYNC_PLUGIN = os.path.join(BUILD_DIR, "test-plugins", "async_plugin.so")

# Steps 100 ms and 800 ms; two attempts, so a retry verdict dead-letters on the second.
RETRY = {"max_attempts": 2, "delay": "100ms", "multiplier": 8, "max_delay": "800ms"}


class PluginAsyncTest(RouterTestCase):
    def setUp(self):
        if not os.path.exists(ASYNC_PLUGIN):
            raise AssertionError("test plugin not built: %s (make er_unit_tests)" % ASYNC_PLUGIN)

    async def start(self, concurrency=10, prefetch=20, timeout="30s", plugin_threads=1, **top):
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.cfg = self.config(
            [{"name": self.q, "bindings": ["as.*"], "prefetch": prefetch, "retry": RETRY,
              "handlers": [{"name": "async-h", "events": ["as.*"], "plugin": ASYNC_PLUGIN,
                            "config": {"log": 1}, "concurrency": concurrency, "timeout": timeout}]}],
            plugin_threads=plugin_threads, **top)
        self.path = self.write_config(self.cfg)
        self.daemon = await self.start_daemon(self.path)
        return self.daemon

    async def handled(self, count, timeout=30.0, **fields):
        return await self.daemon.wait_for_record("handled", timeout=timeout, count=count, **fields)

    async def test_verdicts_by_async_completion(self):
        await self.start()
        ack = self.make_event("as.ok", {"delay_ms": 200})
        dead = self.make_event("as.bad", {"delay_ms": 50, "verdict": "dead_letter"})
        retry = self.make_event("as.flaky", {"verdict": "retry"})
        for ev in (ack, dead, retry):
            await self.publish(ev)
        await self.handled(1, event_id=ack["event_id"], outcome="ack", handler="async-h")
        letters = {m.json()["event_id"]: m.headers for m in await self.get_all(self.dlq, expect=2, timeout=30)}
        h = letters[dead["event_id"]]
        self.assertEqual(h.get("x-death-reason"), "handler_failed", h)
        self.assertEqual(h.get("x-death-detail"), "async reject", h)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        h = letters[retry["event_id"]]
        self.assertEqual(h.get("x-death-reason"), "max_attempts", h)  # retried once, then given up
        self.assertIn("async retry", str(h.get("x-death-detail")), h)
        self.assertEqual(int(h.get("x-attempts")), 2, h)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_many_pending_on_one_plugin_thread(self):
        # plugin_threads 1, concurrency 20: every handle() returns ER_PENDING at
        # once, so all 20 are accepted before the first is completed (2 s later).
        n = 20
        d = await self.start(concurrency=n, prefetch=n, plugin_threads=1)
        events = [self.make_event("as.many", {"delay_ms": 2000}) for _ in range(n)]
        for ev in events:
            await self.publish(ev)
        await d.wait_for_record("accepted", count=n, handler="async-h")
        self.assertEqual(d.records("handled"), [], "an event completed before all were accepted")
        await self.handled(n, outcome="ack")
        self.assertEqual(sorted(r.fields["event_id"] for r in d.records("handled")),
                         sorted(ev["event_id"] for ev in events))
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0)
        self.assertEqual(await d.stop(), 0)

    async def test_pending_timeout_retries(self):
        await self.start(timeout="300ms")
        ev = self.make_event("as.stuck", {"never": 1})
        await self.publish(ev)
        dead = await self.get_all(self.dlq, expect=1, timeout=30)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "max_attempts", h)
        self.assertIn("not completed within 300ms", str(h.get("x-death-detail")), h)
        self.assertEqual(int(h.get("x-attempts")), 2, h)
        self.assertEqual(len(self.daemon.records("accepted")), 2)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_double_completion_settles_once(self):
        await self.start()
        # The plugin's emit (made before it completed) goes out with the ack.
        follow = self.queue_name("follow")
        ch = await self.conn.channel()
        fq = await ch.declare_queue(follow, durable=True)
        await fq.bind(self.exchange, routing_key="follow.#")
        await ch.close()
        ev = self.make_event("as.twice", {"double": 1, "emit": 1})
        await self.publish(ev)
        await self.handled(1, event_id=ev["event_id"], outcome="ack")
        await self.daemon.wait_for_log(r"second completion returned 1")
        await self.daemon.wait_for_log(r"emit after completion returned 1")
        await self.wait_queue_counts(self.q, 0, 0)
        await asyncio.sleep(0.3)
        self.assertEqual(len(self.daemon.records("handled")), 1)
        self.assertEqual(await self.message_count(self.dlq), 0)
        got = await self.get_all(follow, expect=1)
        self.assertEqual(len(got), 1)
        body = got[0].json()
        self.assertEqual(body["event_type"], "follow.up")
        self.assertEqual(body["causation_id"], ev["event_id"])
        self.assertEqual(body["payload"], {"n": 0})
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_sigterm_while_pending(self):
        # Pending events that complete during the drain are settled; those
        # never completed are abandoned at shutdown_timeout and redelivered.
        d = await self.start(shutdown_timeout="2s")
        never = [self.make_event("as.never", {"never": 1}) for _ in range(3)]
        soon = [self.make_event("as.soon", {"delay_ms": 700}) for _ in range(2)]
        for ev in never + soon:
            await self.publish(ev)
        await d.wait_for_record("accepted", count=5)
        d.send_signal(signal.SIGTERM)
        rc = await d.wait_exit(20)
        self.assertEqual(rc, 0, d.tail())
        for ev in soon:
            self.assertEqual(len(d.records("handled", event_id=ev["event_id"], outcome="ack")), 1)
        self.assertEqual(d.records("handled", event_type="as.never"), [])
        self.assertTrue(d.records("shutdown_timeout passed; abandoning in-flight events, the broker will "
                                  "redeliver them"), d.tail())
        self.assertIsNone(d.sanitizer_report())
        # Nothing lost: the three abandoned events are back in the queue.
        await self.wait_queue_counts(self.q, ready=3, unacked=0)
        back = await self.get_all(self.q, expect=3)
        self.assertEqual(sorted(m.json()["event_id"] for m in back), sorted(ev["event_id"] for ev in never))

    async def test_sighup_while_pending(self):
        # Events pending in the old generation are completed after the reload
        # and settled through it; new events go to the new instance.
        d = await self.start()
        old = [self.make_event("as.old", {"delay_ms": 1500}) for _ in range(4)]
        for ev in old:
            await self.publish(ev)
        await d.wait_for_record("accepted", count=4)
        self.cfg["queues"][0]["handlers"][0]["concurrency"] = 5  # a real change: a new generation
        self.write_config(self.cfg)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record("reloaded")
        self.assertEqual(d.records("handled"), [], "completed before the reload; lengthen the delay")
        new = self.make_event("as.new", {"delay_ms": 10})
        await self.publish(new)
        await self.handled(5, outcome="ack")
        self.assertEqual(sorted(r.fields["event_id"] for r in d.records("handled")),
                         sorted(ev["event_id"] for ev in old + [new]))
        # The old instance stayed loaded for its pending events and was
        # cleaned up after the last of them was settled.
        await d.wait_for_record("instance 1 cleaned up")
        lines = d.lines()
        cleaned = next(i for i, line in enumerate(lines) if "instance 1 cleaned up" in line)
        for ev in old:
            settled = next(i for i, line in enumerate(lines) if "handled" in line and ev["event_id"] in line)
            self.assertLess(settled, cleaned, d.tail())
        self.assertLess(next(i for i, line in enumerate(lines) if "instance 2 started" in line),
                        next(i for i, line in enumerate(lines) if "reloaded" in line))
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0)
        self.assertEqual(await d.stop(), 0)


if __name__ == "__main__":
    unittest.main()
