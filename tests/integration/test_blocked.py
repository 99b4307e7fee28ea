"""Broker resource alarms (connection.blocked / connection.unblocked).

On a second RabbitMQ node of our own (never the shared one), the memory
watermark is dropped to trigger an alarm while events are in flight:

- the daemon logs that the broker blocked publishing;
- handlers go on: a good event finishing during the alarm is handled (its ack
  shares the connection, which RabbitMQ stops reading while it blocks it, so
  the ack reaches the broker when it unblocks);
- a dead-letter copy made during the alarm is held by the daemon (not written
  into the blocked connection) and reaches the DLQ once the broker unblocks;
  its original is acked only then; nothing is lost, nothing is copied twice.
"""
import asyncio
import time
import unittest

from harness import RouterTestCase

from broker_node import BrokerNode, publish_events


class BlockedTest(RouterTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.node = BrokerNode.for_class(cls)

    def counts(self):
        """{queue: ready messages} on the second node."""
        out = {}
        for line in self.node.ctl("list_queues", "-q", "name", "messages").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
        return out

    async def wait_counts(self, want, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            got = await asyncio.to_thread(self.counts)
            if all(got.get(q) == n for q, n in want.items()):
                return got
            if time.monotonic() > deadline:
                self.fail("queues: wanted %r, have %r%s" % (want, got, self._daemon_tail()))
            await asyncio.sleep(0.2)

    async def test_copies_wait_while_blocked_and_consuming_goes_on(self):
        node = self.node
        if not node.running():
            await asyncio.to_thread(node.start)
        q = self.queue_name("blk")
        dlq = q + ".dlq"
        # Handlers by type: b.fail exits 65 after 2 s, b.ok succeeds after 2 s,
        # b.slowfail exits 65 after 6 s (its copy is made while the alarm is on).
        handlers = [
            {"name": "fail", "events": ["b.fail"], "exec": ["/bin/sh", "-c", "cat >/dev/null; sleep 2; exit 65"]},
            {"name": "ok", "events": ["b.ok"], "exec": ["/bin/sh", "-c", "cat >/dev/null; sleep 2"]},
            {"name": "slowfail", "events": ["b.slowfail"],
             "exec": ["/bin/sh", "-c", "cat >/dev/null; sleep 6; exit 65"]},
        ]
        cfg = self.config([{"name": q, "bindings": ["b.*"], "handlers": handlers}])
        cfg["broker"] = {"url": node.url, "heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "2s"}}
        d = await self.start_daemon(self.write_config(cfg))

        # One copy first, so the broker sees this connection as a publisher.
        await publish_events(node.url, self.exchange, [self.make_event("b.fail")])
        await self.wait_counts({dlq: 1, q: 0})

        e1, e2, e3 = self.make_event("b.fail"), self.make_event("b.ok"), self.make_event("b.slowfail")
        await publish_events(node.url, self.exchange, [e1, e2, e3])
        await asyncio.sleep(0.5)
        await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.0000001")
        try:
            await d.wait_for_record("the broker blocked publishing (resource alarm); copies wait, consuming goes on",
                                    timeout=20)
            # Consuming and acking go on: the good event is handled and acked.
            await d.wait_for_record("handled", event_id=e2["event_id"], outcome="ack", timeout=20)
            # e3's copy is made during the alarm: it waits, and so does its original.
            await d.wait_for_record("handled", event_id=e3["event_id"], outcome="dead-letter", timeout=20)
            await asyncio.sleep(1.0)
            got = await asyncio.to_thread(self.counts)
            self.assertEqual(got.get(dlq), 1, "no copy may pass while the broker blocks: %r" % got)
            self.assertTrue(d.running(), d.tail())
        finally:
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
        # e3's copy was held by the daemon, not pushed into the blocked connection.
        await d.wait_for_record("the broker unblocked publishing", waiting="1", timeout=30)
        # Both copies arrive, both originals are acked: nothing lost, nothing twice.
        await self.wait_counts({dlq: 3, q: 0})
        await asyncio.sleep(0.5)
        info = await asyncio.to_thread(node.ctl, "list_queues", "-q", "name", "messages_unacknowledged")
        self.assertIn("%s\t0" % q, info)
        self.assertTrue(d.running(), d.tail())
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
