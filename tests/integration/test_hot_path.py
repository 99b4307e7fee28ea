"""The hot path's settings through the real broker.

- Coalesced acks (`broker.ack_window`): an event still running is never
  acked, not even by a `multiple` ack of the events behind it, which go out
  while it runs; a burst is acked in fewer `basic.ack` frames than events
  (`event_router_ack_frames_total`), and `ack_window: 0` sends one per event.
- The per-event `handled` line (`log.events`, `log.sample`): off, sampled
  (every failure still written), or at debug.
"""
import asyncio
import unittest

from broker_node import publish_events
from harness import AMQP_URL
from test_http_metrics import HttpTestBase, value


class AckCoalescingTest(HttpTestBase):
    async def test_a_running_event_stays_unacked_while_later_ones_are_acked(self):
        q = self.queue_name("work")
        rec = self.recorder("rec", events=["#"])
        records = rec["exec"][1]
        path = self.write_config(self.config(
            [{"name": q, "bindings": ["work.*"], "prefetch": 5, "handlers": [rec]}],
            broker={"url": AMQP_URL, "heartbeat": "30s", "ack_window": "200ms"}))
        d = await self.start_daemon(path)
        head = self.make_event("work.slow", {"sleep": 8})
        await self.publish(head)
        await self.wait_records(records, 1)
        fast = [self.make_event("work.fast") for _ in range(4)]
        for ev in fast:
            await self.publish(ev)
        await self.wait_records(records, 5)
        # The four behind it are acked (one by one, after the window) while
        # the head still runs: a multiple ack of the last would ack it too.
        await self.wait_queue_counts(q, ready=0, unacked=1, timeout=6)
        self.assertEqual(self.read_records(records, "done"), [], "the head finished too early for this test")
        await self.wait_records(records, 1, timeout=20, phase="done")
        await self.wait_queue_counts(q, ready=0, unacked=0)
        handled = d.records("handled")
        self.assertEqual(sorted(r.fields["event_id"] for r in handled),
                         sorted(e["event_id"] for e in [head] + fast))
        self.assertEqual({r.fields["outcome"] for r in handled}, {"ack"})
        self.assertEqual(await self.message_count(q + ".dlq"), 0)

    async def burst(self, ack_window: str, events: int = 600):
        """Preloads `events`, then lets the no-op plugin drain them; returns
        (acked events, ack frames) from /metrics."""
        q = self.queue_name("burst")
        cfg = self.config(
            [{"name": q, "bindings": ["burst.*"], "prefetch": 100,
              "handlers": [{"name": "noop", "events": ["#"], "plugin": "libnoop_plugin.so"}]}],
            log={"level": "warn"})
        cfg["broker"]["ack_window"] = ack_window
        path = self.http_config(cfg)
        d = await self.start_daemon(path, wait_ready=False)
        await self.wait_queue_counts(q, ready=0, unacked=0)  # declared and consumed
        await d.stop()
        await publish_events(AMQP_URL, self.exchange,
                             [self.make_event("burst.one") for _ in range(events)])
        await self.wait_queue_counts(q, ready=events, unacked=0)
        await self.start_daemon(path, wait_ready=False)
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=60)
        m = await self.metrics()
        return (value(m, "event_router_events_handled_total", queue=q, handler="noop", outcome="ack"),
                value(m, "event_router_ack_frames_total"))

    async def test_a_burst_is_acked_in_fewer_frames_than_events(self):
        acked, frames = await self.burst("10ms")
        self.assertEqual(acked, 600)
        self.assertGreater(frames, 0)
        self.assertLess(frames, 600 / 2, "acks were not coalesced")

    async def test_ack_window_zero_sends_one_ack_per_event(self):
        acked, frames = await self.burst("0")
        self.assertEqual(acked, 600)
        self.assertEqual(frames, 600)


class EventLineTest(HttpTestBase):
    async def run_events(self, log, events):
        q = self.queue_name("work")
        rec = self.recorder("rec", events=["#"])
        path = self.write_config(self.config(
            [{"name": q, "bindings": ["work.*"], "prefetch": 10, "handlers": [rec], "retry": {"max_attempts": 1}}],
            log=log))
        d = await self.start_daemon(path, wait_ready=log.get("level", "info") in ("info", "debug"))
        for ev in events:
            await self.publish(ev)
        await self.wait_records(rec["exec"][1], len(events))
        await self.wait_queue_counts(q, ready=0, unacked=0)
        await d.stop()
        return d

    async def test_events_off_writes_no_handled_line(self):
        d = await self.run_events({"level": "info", "events": "off"},
                                  [self.make_event("work.ok"), self.make_event("work.bad", {"exit_code": 65})])
        self.assertEqual(d.records("handled"), [], d.tail())
        self.assertTrue(d.records("dead-lettering"), "the failure is still visible: " + d.tail())
        self.assertTrue(d.records("ready"), d.tail())

    async def test_sample_writes_one_success_in_n_and_every_failure(self):
        ok = [self.make_event("work.ok") for _ in range(6)]
        bad = self.make_event("work.bad", {"exit_code": 65})
        d = await self.run_events({"level": "info", "sample": 3}, ok + [bad])
        handled = d.records("handled")
        self.assertEqual(len([r for r in handled if r.fields.get("outcome") == "ack"]), 2, d.tail())
        failed = [r for r in handled if r.fields.get("outcome") != "ack"]
        self.assertEqual([r.fields["event_id"] for r in failed], [bad["event_id"]], d.tail())
        self.assertEqual(failed[0].level, "warn")

    async def test_events_at_debug_follow_the_level(self):
        ev = self.make_event("work.ok")
        d = await self.run_events({"level": "info", "events": "debug"}, [ev])
        self.assertEqual(d.records("handled"), [], d.tail())
        ev = self.make_event("work.ok")
        d = await self.run_events({"level": "debug", "events": "debug"}, [ev])
        lines = d.records("handled", event_id=ev["event_id"])
        self.assertEqual([r.level for r in lines], ["debug"], d.tail())


if __name__ == "__main__":
    unittest.main()
