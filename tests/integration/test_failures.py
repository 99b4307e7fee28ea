"""Failures: handler exit codes, invalid bodies and unhandled events end up in
<queue>.dlq with the documented headers (or are acked, when configured)."""
import asyncio
import re
import secrets
import unittest

from harness import RETRY_EXHAUSTED_REASONS, RouterTestCase, no_retry

DLQ_HEADERS = ("x-death-reason", "x-death-detail", "x-death-handler", "x-attempts", "x-first-failed-at",
               "x-last-failed-at", "x-original-exchange", "x-original-routing-key", "x-original-queue")


class FailuresTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q_work = self.queue_name("work")
        self.q_lenient = self.queue_name("lenient")
        self.work_rec = self.recorder("work-rec", events=["work.*"], timeout="20s")
        self.lenient_rec = self.recorder("lenient-rec", events=["lenient.handled"])
        cfg = self.config([
            # These tests are about what a dead letter carries, not about retries: no retries.
            {"name": self.q_work, "bindings": ["work.#"], "prefetch": 10, "unhandled": "dead-letter",
             "handlers": [self.work_rec], **no_retry()},
            {"name": self.q_lenient, "bindings": ["lenient.*"], "prefetch": 10, "unhandled": "ack",
             "handlers": [self.lenient_rec]},
        ])
        self.daemon = await self.start_daemon(self.write_config(cfg))

    def assert_dead_letter_headers(self, msg, *, reason, routing_key, queue, handler=None):
        h = msg.headers
        required = [k for k in DLQ_HEADERS if handler is not None or k != "x-death-handler"]
        missing = [k for k in required if k not in h]
        self.assertEqual(missing, [], "dead letter lacks headers; has %r" % h)
        if isinstance(reason, tuple):
            self.assertIn(h["x-death-reason"], reason, h)
        else:
            self.assertEqual(h["x-death-reason"], reason, h)
        self.assertTrue(str(h["x-death-detail"]).strip(), h)
        if handler is not None:
            self.assertEqual(h["x-death-handler"], handler, h)
        self.assertGreaterEqual(int(h["x-attempts"]), 1, h)
        self.assertTrue(h["x-first-failed-at"], h)
        self.assertTrue(h["x-last-failed-at"], h)
        self.assertEqual(h["x-original-exchange"], self.exchange, h)
        self.assertEqual(h["x-original-routing-key"], routing_key, h)
        self.assertEqual(h["x-original-queue"], queue, h)

    async def test_exit_3_dead_letters_with_detail_and_daemon_keeps_going(self):
        marker = "boom-" + secrets.token_hex(4)
        bad = self.make_event("work.fail", {"exit_code": 3, "stderr": marker})
        body = await self.publish(bad, headers={"app-header": "keep-me"})
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        m = dead[0]
        self.assertEqual(m.body, body, "dead letter body differs from the original")
        self.assertEqual(m.message_id, bad["event_id"])
        self.assertEqual(m.correlation_id, bad["correlation_id"])
        self.assertEqual(m.content_type, "application/json")
        self.assertEqual(m.delivery_mode, 2, "dead letter should stay persistent")
        self.assertEqual(m.headers.get("app-header"), "keep-me", "original headers lost: %r" % m.headers)
        self.assert_dead_letter_headers(m, reason=RETRY_EXHAUSTED_REASONS, routing_key="work.fail",
                                        queue=self.q_work, handler="work-rec")
        detail = str(m.headers["x-death-detail"])
        self.assertRegex(detail, r"\bexit (code|status) 3\b", detail)
        self.assertIn(marker, detail, "stderr text missing from x-death-detail")
        # The handler's stderr goes to the daemon log too.
        await self.daemon.wait_for_log(re.escape(marker))
        handled = await self.daemon.wait_for_record("handled", event_id=bad["event_id"])
        # Exit 3 is a "retry" verdict; for now retries are dead-lettered at once.
        self.assertIn(handled[-1].fields.get("outcome"), ("retry", "dead-letter"), handled[-1].line)

        # The daemon keeps going: a good event after it is handled and acked.
        good = self.make_event("work.ok", {"exit_code": 0})
        await self.publish(good)
        recs = await self.wait_records(self.work_rec["exec"][1], 2)
        self.assertEqual([r["env"]["EVENT_ID"] for r in recs].count(good["event_id"]), 1)
        handled = await self.daemon.wait_for_record("handled", event_id=good["event_id"])
        self.assertEqual(handled[0].fields.get("outcome"), "ack")
        await self.wait_queue_counts(self.q_work, 0, 0)
        self.assertEqual(await self.message_count(self.q_work + ".dlq"), 0)
        self.assertTrue(self.daemon.running())
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exit_65_dead_letters(self):
        bad = self.make_event("work.reject", {"exit_code": 65, "stderr": "bad input"})
        body = await self.publish(bad)
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0].body, body)
        h = dead[0].headers
        # 65 is a dead-letter verdict: never retried, whatever the retry settings.
        self.assertEqual(h.get("x-death-reason"), "handler_failed", h)
        self.assertEqual(h.get("x-death-handler"), "work-rec", h)
        self.assertIn("65", str(h.get("x-death-detail")), h)
        self.assertEqual(h.get("x-original-routing-key"), "work.reject", h)
        self.assertEqual(h.get("x-original-queue"), self.q_work, h)
        handled = await self.daemon.wait_for_record("handled", event_id=bad["event_id"])
        self.assertEqual(handled[-1].fields.get("outcome"), "dead-letter", handled[-1].line)
        # Handled once, not retried.
        await asyncio.sleep(0.5)
        self.assertEqual(len(self.read_records(self.work_rec["exec"][1])), 1)
        await self.wait_queue_counts(self.q_work, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_invalid_json_dead_letters(self):
        body = b"this is {not json"
        await self.publish_raw(body, "work.garbage", message_id="not-json-1", correlation_id="cid-not-json")
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        m = dead[0]
        self.assertEqual(m.body, body)
        self.assertEqual(m.message_id, "not-json-1")
        self.assertEqual(m.correlation_id, "cid-not-json")
        self.assert_dead_letter_headers(m, reason="invalid_json", routing_key="work.garbage", queue=self.q_work)
        # No handler ran for it.
        self.assertEqual(self.read_records(self.work_rec["exec"][1]), [])
        await self.wait_queue_counts(self.q_work, 0, 0)
        # Still alive and working.
        good = self.make_event("work.ok")
        await self.publish(good)
        await self.wait_records(self.work_rec["exec"][1], 1)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_unhandled_dead_letters_when_configured(self):
        ev = self.make_event("work.nobody.home")  # bound (work.#) but no handler pattern (work.*) matches
        body = await self.publish(ev)
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0].body, body)
        self.assertEqual(dead[0].message_id, ev["event_id"])
        self.assert_dead_letter_headers(dead[0], reason="unhandled", routing_key="work.nobody.home",
                                        queue=self.q_work)
        self.assertEqual(self.read_records(self.work_rec["exec"][1]), [])
        await self.wait_queue_counts(self.q_work, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_unhandled_acked_when_configured(self):
        ev = self.make_event("lenient.other")
        await self.publish(ev)
        await self.daemon.wait_for_log(re.escape(ev["event_id"]))
        line = [x for x in self.daemon.lines() if ev["event_id"] in x][0]
        self.assertRegex(line, r"unhandled|no handler|outcome=ack", line)
        await self.wait_queue_counts(self.q_lenient, 0, 0)
        await asyncio.sleep(0.3)
        self.assertEqual(await self.message_count(self.q_lenient + ".dlq"), 0)
        self.assertEqual(self.read_records(self.lenient_rec["exec"][1]), [])
        # A matching event on the same queue is still handled.
        ok = self.make_event("lenient.handled")
        await self.publish(ok)
        recs = await self.wait_records(self.lenient_rec["exec"][1], 1)
        self.assertEqual(recs[0]["env"]["EVENT_ID"], ok["event_id"])
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exit_75_is_not_lost(self):
        # 75 (EX_TEMPFAIL) asks for a retry; with no retries left it is dead-lettered.
        ev = self.make_event("work.tempfail", {"exit_code": 75})
        body = await self.publish(ev)
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(dead[0].body, body)
        self.assertEqual(dead[0].headers.get("x-death-handler"), "work-rec")
        self.assertIn("75", str(dead[0].headers.get("x-death-detail")))
        handled = await self.daemon.wait_for_record("handled", event_id=ev["event_id"])
        self.assertEqual(handled[-1].fields.get("outcome"), "retry", handled[-1].line)
        await self.wait_queue_counts(self.q_work, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_handler_killed_by_signal_dead_letters(self):
        ev = self.make_event("work.crash", {"kill_signal": 9})
        body = await self.publish(ev)
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(dead[0].body, body)
        self.assertIn(dead[0].headers.get("x-death-reason"), RETRY_EXHAUSTED_REASONS, dead[0].headers)
        self.assertRegex(str(dead[0].headers.get("x-death-detail")), r"(?i)signal|SIGKILL|\b9\b")
        await self.wait_queue_counts(self.q_work, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_handler_timeout_dead_letters(self):
        q = self.queue_name("timeout")
        rec = self.recorder("slow-rec", events=["#"], timeout="1s")
        await self.daemon.stop()
        d = await self.start_daemon(self.write_config(self.config(
            [{"name": q, "bindings": ["slow.*"], "handlers": [rec], **no_retry()}]), "timeout.yaml"))
        ev = self.make_event("slow.job", {"sleep": 20})
        body = await self.publish(ev)
        dead = await self.get_all(q + ".dlq", expect=1, timeout=30)
        self.assertEqual(dead[0].body, body)
        self.assertEqual(dead[0].headers.get("x-death-handler"), "slow-rec")
        self.assertRegex(str(dead[0].headers.get("x-death-detail")), r"(?i)time")
        self.assertEqual(self.read_records(rec["exec"][1], "done"), [], "handler was not stopped")
        handled = await d.wait_for_record("handled", event_id=ev["event_id"])
        self.assertGreaterEqual(float(handled[-1].fields.get("duration_ms", "0")), 900)
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await d.stop(), 0)

    async def test_non_object_json_dead_letters(self):
        await self.publish_raw(b"[1, 2, 3]", "work.array")
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(dead[0].body, b"[1, 2, 3]")
        self.assertTrue(dead[0].headers.get("x-death-reason"), dead[0].headers)
        self.assertEqual(dead[0].headers.get("x-original-routing-key"), "work.array")
        self.assertEqual(self.read_records(self.work_rec["exec"][1]), [])
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_handler_output_goes_to_daemon_log(self):
        out_marker, err_marker = "out-" + secrets.token_hex(4), "err-" + secrets.token_hex(4)
        ev = self.make_event("work.chatty", {"stdout": out_marker, "stderr": err_marker})
        await self.publish(ev)
        await self.daemon.wait_for_log(re.escape(out_marker))
        await self.daemon.wait_for_log(re.escape(err_marker))
        handled = await self.daemon.wait_for_record("handled", event_id=ev["event_id"])
        self.assertEqual(handled[-1].fields.get("outcome"), "ack")
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_camel_case_failure_keeps_ids_in_dead_letter(self):
        ev = self.make_camel_event("work.fail", {"exit_code": 3, "stderr": "camel boom"})
        published = await self.publish_camel([ev])
        dead = await self.get_all(self.q_work + ".dlq", expect=1)
        self.assertEqual(dead[0].body.decode(), published[0]["body"])
        self.assertEqual(dead[0].message_id, ev["eventId"])
        self.assertEqual(dead[0].correlation_id, ev["correlationId"])
        self.assertIn(dead[0].headers.get("x-death-reason"), RETRY_EXHAUSTED_REASONS, dead[0].headers)
        handled = await self.daemon.wait_for_record("handled", event_id=ev["eventId"])
        self.assertIn(handled[-1].fields.get("outcome"), ("retry", "dead-letter"), handled[-1].line)
        self.assertEqual(await self.daemon.stop(), 0)


if __name__ == "__main__":
    unittest.main()
