"""Shutdown: SIGTERM lets in-flight handlers finish (and acks their events);
a handler past shutdown_timeout leaves its event unacked for redelivery."""
import signal
import time
import unittest

from harness import RouterTestCase


class ShutdownTest(RouterTestCase):
    def make_config(self, shutdown_timeout, handler_args=()):
        self.q = self.queue_name("slow")
        self.rec = self.recorder("slow-rec", events=["#"], record=getattr(self, "record_path", None),
                                 args=handler_args, timeout="60s")
        self.record_path = self.rec["exec"][1]
        return self.write_config(self.config(
            [{"name": self.q, "bindings": ["slow.*"], "prefetch": 5, "handlers": [self.rec]}],
            shutdown_timeout=shutdown_timeout))

    async def test_sigterm_waits_for_inflight_handler_and_acks(self):
        d = await self.start_daemon(self.make_config("10s"))
        ev = self.make_event("slow.job", {"sleep": 2})
        await self.publish(ev)
        await self.wait_records(self.record_path, 1)
        t0 = time.monotonic()
        d.send_signal(signal.SIGTERM)
        rc = await d.wait_exit(40)
        elapsed = time.monotonic() - t0
        self.assertIsNotNone(rc, "daemon still running 40s after SIGTERM:\n" + d.tail())
        self.assertEqual(rc, 0, d.tail())
        done = self.read_records(self.record_path, "done")
        self.assertEqual(len(done), 1, "handler did not finish before the daemon exited")
        self.assertGreaterEqual(elapsed, 1.0, "daemon exited before the 2 s handler could have finished")
        self.assertEqual(len(self.read_records(self.record_path)), 1)
        handled = d.records("handled", event_id=ev["event_id"])
        self.assertEqual([r.fields.get("outcome") for r in handled], ["ack"], d.tail())
        # Acked: nothing ready once the daemon's connection is gone.
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.q + ".dlq"), 0)

    async def test_sigint_is_graceful_too(self):
        d = await self.start_daemon(self.make_config("10s"))
        ev = self.make_event("slow.job", {"sleep": 1})
        await self.publish(ev)
        await self.wait_records(self.record_path, 1)
        self.assertEqual(await d.stop(signal.SIGINT), 0, d.tail())
        self.assertEqual(len(self.read_records(self.record_path, "done")), 1)
        await self.wait_queue_counts(self.q, 0, 0)

    async def test_idle_sigterm_exits_zero(self):
        d = await self.start_daemon(self.make_config("10s"))
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_handler_past_shutdown_timeout_leaves_event_for_redelivery(self):
        d1 = await self.start_daemon(self.make_config("1s"))
        ev = self.make_event("slow.job", {"sleep": 30})
        body = await self.publish(ev)
        first = await self.wait_records(self.record_path, 1)
        self.assertEqual(first[0]["env"]["REDELIVERED"], "0")
        t0 = time.monotonic()
        d1.send_signal(signal.SIGTERM)
        rc = await d1.wait_exit(15)
        self.assertIsNotNone(rc, "daemon did not exit within 15s of SIGTERM with shutdown_timeout 1s:\n"
                             + d1.tail())
        self.assertGreaterEqual(time.monotonic() - t0, 0.9, "exited before shutdown_timeout elapsed")
        self.assertEqual(self.read_records(self.record_path, "done"), [])
        # Not acked, not dead-lettered: back in the queue.
        await self.wait_queue_counts(self.q, ready=1, unacked=0)
        self.assertEqual(await self.message_count(self.q + ".dlq"), 0)

        # A second daemon (whose handler ignores payload.sleep) gets it redelivered.
        d2 = await self.start_daemon(self.make_config("10s", handler_args=["--ignore-payload-sleep"]))
        recs = await self.wait_records(self.record_path, 2)
        again = recs[1]
        self.assertEqual(again["env"]["EVENT_ID"], ev["event_id"])
        self.assertEqual(again["env"]["REDELIVERED"], "1")
        self.assertGreaterEqual(int(again["env"]["ATTEMPT"]), 1)
        self.assertEqual(again["body"], body.decode())
        handled = await d2.wait_for_record("handled", event_id=ev["event_id"])
        self.assertEqual(handled[0].fields.get("outcome"), "ack")
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await d2.stop(), 0, d2.tail())


if __name__ == "__main__":
    unittest.main()
