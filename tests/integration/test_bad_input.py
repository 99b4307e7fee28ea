"""Bad input: each kind of undecodable or unacceptable message goes straight to
<queue>.dlq with its own reason code and detail, is never retried and never
reaches a handler, and the daemon keeps handling the good events after it.
Odd but acceptable input (duplicate keys, \\u0000 in the payload, 1e300) is
handled. See the decisions in src/event/envelope.cpp."""
import asyncio
import json
import os
import re
import unittest
from typing import Optional

from harness import SOURCE_DIR, RouterTestCase, run_check

SCHEMAS_DIR = os.path.join(SOURCE_DIR, "config", "schemas", "events")
RETRY = {"max_attempts": 3, "delay": "100ms", "multiplier": 2, "max_delay": "200ms"}


class BadInputTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.rec = self.recorder("good-rec", events=["good.#"])
        # Bound to everything ("#" also routes the empty routing key); retries
        # configured, so "never retried" means something.
        self.cfg = self.config([{"name": self.q, "bindings": ["#"], "max_message_bytes": "1KiB",
                                 "unhandled": "dead-letter", "retry": RETRY, "handlers": [self.rec]}])
        self.daemon = await self.start_daemon(self.write_config(self.cfg))
        self.good_ids = []

    # -- helpers -------------------------------------------------------------------

    def good_event(self, **fields):
        return self.make_event("good.thing", {"n": len(self.good_ids)}, **fields)

    async def publish_good_and_wait(self, daemon=None, event=None):
        """Publishes a good event and waits until the handler ran for it and it was acked."""
        daemon = daemon or self.daemon
        ev = event or self.good_event()
        await self.publish(ev)
        self.good_ids.append(ev["event_id"])
        await daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        return ev

    async def bad_then_good(self, body: bytes, routing_key: str, reason: str, detail_re: str,
                            message_id: str = "bad-1", expect_body: Optional[bytes] = None):
        """Publishes `body`, then a good event. Checks the dead letter (reason,
        detail, x-attempts 1, body and routing headers), that no handler ran for
        it, that it was not retried, and that the good event was handled."""
        await self.publish_raw(body, routing_key, message_id=message_id, correlation_id="cid-" + message_id)
        await self.publish_good_and_wait()
        dead = await self.get_all(self.dlq, expect=1)
        self.assertEqual(len(dead), 1, [m.headers for m in dead])
        m = dead[0]
        h = m.headers
        self.assertEqual(m.body, body if expect_body is None else expect_body, "the dead letter's body differs")
        self.assertEqual(m.message_id, message_id)
        self.assertEqual(m.correlation_id, "cid-" + message_id)
        self.assertEqual(h.get("x-death-reason"), reason, h)
        self.assertRegex(str(h.get("x-death-detail")), detail_re, h)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        self.assertNotIn("x-death-handler", h, "a handler is blamed for bad input: %r" % h)
        self.assertEqual(h.get("x-original-exchange"), self.exchange, h)
        self.assertEqual(h.get("x-original-routing-key"), routing_key, h)
        self.assertEqual(h.get("x-original-queue"), self.q, h)
        self.assertTrue(h.get("x-first-failed-at") and h.get("x-last-failed-at"), h)
        # No handler ran for it: the handler saw exactly the good events.
        recs = self.read_records(self.rec["exec"][1])
        self.assertEqual([r["env"]["EVENT_ID"] for r in recs], self.good_ids)
        # Never retried: no retry copy, nothing logged as a retry, nothing in flight.
        self.assertEqual(self.daemon.records("retrying later"), [])
        for ms in (100, 200):
            self.assertEqual(await self.message_count("%s.retry.%d" % (self.q, ms)), 0)
        await self.wait_queue_counts(self.q, 0, 0)
        dead_logs = [r for r in self.daemon.records("dead-lettering") if r.fields.get("reason") == reason]
        self.assertEqual(len(dead_logs), 1, self.daemon.tail())
        self.assertTrue(self.daemon.running())
        return m

    async def good_odd_input(self, body: bytes, event_id: str):
        """Publishes an odd but acceptable body; the handler gets it as is."""
        await self.publish_raw(body, "good.odd", message_id=event_id)
        await self.daemon.wait_for_record("handled", event_id=event_id, outcome="ack")
        recs = self.read_records(self.rec["exec"][1])
        self.assertEqual(len(recs), 1, recs)
        self.assertEqual(recs[0]["env"]["EVENT_ID"], event_id)
        self.assertEqual(recs[0]["body"].encode("utf-8"), body, "the handler got another body")
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0)
        self.good_ids.append(event_id)
        await self.publish_good_and_wait()
        return recs[0]

    # -- rejected input ---------------------------------------------------------------

    async def test_invalid_utf8_is_invalid_json(self):
        body = b'{"event_id": "e-utf8", "event_type": "good.thing", "payload": {"name": "caf\xc3\x28 \xff"}}'
        await self.bad_then_good(body, "good.thing", "invalid_json", r"invalid JSON at offset \d+: .*[Ee]ncoding")

    async def test_not_json_is_invalid_json(self):
        await self.bad_then_good(b"hello, this is not json", "good.thing", "invalid_json",
                                 r"^invalid JSON at offset 0: ")

    async def test_trailing_garbage_is_invalid_json(self):
        body = json.dumps(self.make_event("good.thing")).encode() + b" {}"
        await self.bad_then_good(body, "good.thing", "invalid_json", r"invalid JSON at offset \d+")

    async def test_json_array_is_not_object(self):
        await self.bad_then_good(b'[{"event_type": "good.thing"}]', "good.thing", "not_object",
                                 r"top-level JSON value is an array")

    async def test_no_event_type_and_empty_routing_key_is_no_event_type(self):
        ev = self.make_event(None)
        body = json.dumps(ev).encode()
        await self.bad_then_good(body, "", "no_event_type", r"no event_type and the routing key is empty",
                                 message_id=ev["event_id"])

    async def test_no_event_type_falls_back_to_a_non_empty_routing_key(self):
        # Not bad input: the routing key names the type.
        ev = self.make_event(None)
        await self.publish(ev, routing_key="good.from-key")
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        recs = self.read_records(self.rec["exec"][1])
        self.assertEqual(recs[0]["env"]["EVENT_TYPE"], "good.from-key")
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_too_large_body(self):
        ev = self.make_event("good.thing", {"pad": "x" * 2048})
        body = json.dumps(ev).encode()
        self.assertGreater(len(body), 2048)
        # The daemon keeps no more than max_message_bytes of a body: the
        # dead letter carries those, and its detail says so.
        await self.bad_then_good(body, "good.thing", "too_large",
                                 r"body of %d bytes exceeds max_message_bytes 1024; this copy keeps its first 1024 "
                                 r"bytes" % len(body),
                                 message_id=ev["event_id"], expect_body=body[:1024])

    async def test_body_of_exactly_max_message_bytes_is_accepted(self):
        ev = self.make_event("good.thing", {"pad": ""})
        ev["payload"]["pad"] = "y" * (1024 - len(json.dumps(ev).encode()))
        body = json.dumps(ev).encode()
        self.assertEqual(len(body), 1024)
        await self.good_odd_input(body, ev["event_id"])

    async def test_unhandled_event_type(self):
        ev = self.make_event("nobody.home")
        body = json.dumps(ev).encode()
        await self.bad_then_good(body, "nobody.home", "unhandled",
                                 r"no handler of queue '%s' takes event type 'nobody\.home'" % re.escape(self.q),
                                 message_id=ev["event_id"])

    async def test_deep_nesting_is_invalid_json(self):
        deep = "[" * 70 + "]" * 70
        body = ('{"event_id": "e-deep", "event_type": "good.thing", "payload": {"deep": %s}}' % deep).encode()
        await self.bad_then_good(body, "good.thing", "invalid_json", r"nesting")

    async def test_nul_in_event_type_is_invalid_json(self):
        ev = self.make_event("good.thing")
        ev["event_type"] = "good.\u0000thing"
        body = json.dumps(ev).encode()
        self.assertIn(b"\\u0000", body)
        await self.bad_then_good(body, "good.thing", "invalid_json", r"NUL character in event_type",
                                 message_id=ev["event_id"])

    async def test_raw_nul_byte_is_invalid_json(self):
        body = json.dumps(self.make_event("good.thing")).encode() + b"\x00"
        await self.bad_then_good(body, "good.thing", "invalid_json", r"NUL byte")

    async def test_number_too_big_for_a_double_is_invalid_json(self):
        body = b'{"event_id": "e-big", "event_type": "good.thing", "payload": {"n": 1e400}}'
        await self.bad_then_good(body, "good.thing", "invalid_json", r"(?i)number too big")

    # -- accepted odd input ---------------------------------------------------------

    async def test_duplicate_keys_first_wins(self):
        first, second = "dup-first-" + self.prefix, "dup-second-" + self.prefix
        body = ('{"event_id": "%s", "event_type": "good.dup", "event_id": "%s", "event_type": "bad.dup", '
                '"payload": {}}' % (first, second)).encode()
        rec = await self.good_odd_input(body, first)
        self.assertEqual(rec["env"]["EVENT_TYPE"], "good.dup")

    async def test_nul_inside_a_payload_string_is_accepted(self):
        ev = self.make_event("good.thing", {"text": "before\u0000after"})
        body = json.dumps(ev).encode()
        self.assertIn(b"\\u0000", body)
        await self.good_odd_input(body, ev["event_id"])

    async def test_huge_but_finite_number_in_payload_is_accepted(self):
        eid = "e-1e300-" + self.prefix
        body = ('{"event_id": "%s", "event_type": "good.thing", "payload": {"n": 1e300, "big": '
                '123456789012345678901234567890}}' % eid).encode()
        await self.good_odd_input(body, eid)

    async def test_nesting_of_64_levels_is_accepted(self):
        eid = "e-64-" + self.prefix
        # The envelope object is level 1, payload level 2, then 62 arrays.
        body = ('{"event_id": "%s", "event_type": "good.thing", "payload": {"deep": %s}}'
                % (eid, "[" * 62 + "]" * 62)).encode()
        await self.good_odd_input(body, eid)

    # -- schemas ------------------------------------------------------------------------

    async def test_schema_violation(self):
        q = self.queue_name("speakers")
        rec = self.recorder("speaker-rec", events=["speaker.*"])
        cfg = self.config([{"name": q, "bindings": ["speaker.*"], "retry": RETRY, "handlers": [rec]}],
                          schemas=SCHEMAS_DIR)
        path = self.write_config(cfg, "schemas.yaml")
        check = await asyncio.to_thread(run_check, path)
        if check.returncode != 0 and re.search(r"unknown key 'schemas'", check.stdout + check.stderr):
            self.skipTest("the daemon does not know the top-level key `schemas:` yet (--check: %s)"
                          % (check.stdout + check.stderr).strip())
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        await self.daemon.stop()
        d = await self.start_daemon(path)

        payload = {"speaker_id": "spk-1", "external_id": "ext-1", "name": "Ada"}  # no bucket
        bad = self.make_event("speaker.onboarded", payload)
        body = await self.publish(bad)
        good = self.make_event("speaker.onboarded", dict(payload, bucket="b-1"))
        await self.publish(good)
        await d.wait_for_record("handled", event_id=good["event_id"], outcome="ack", timeout=20)
        dead = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual(len(dead), 1)
        m = dead[0]
        h = m.headers
        self.assertEqual(m.body, body)
        self.assertEqual(h.get("x-death-reason"), "schema_violation", h)
        detail = str(h.get("x-death-detail"))
        self.assertIn("required", detail)
        self.assertIn("bucket", detail)
        self.assertIn("speaker.onboarded", detail)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        self.assertEqual(h.get("x-original-routing-key"), "speaker.onboarded", h)
        self.assertEqual(h.get("x-original-queue"), q, h)
        recs = self.read_records(rec["exec"][1])
        self.assertEqual([r["env"]["EVENT_ID"] for r in recs], [good["event_id"]], "the invalid event reached the handler")
        self.assertEqual(d.records("retrying later"), [])
        await self.wait_queue_counts(q, 0, 0)

        # envelope.json applies to every event: a timestamp that is not ISO 8601.
        bad_env = self.make_event("speaker.updated", {"speaker_id": "spk-1"}, timestamp="yesterday")
        await self.publish(bad_env)
        good2 = self.make_event("speaker.onboarded", dict(payload, bucket="b-2"))
        await self.publish(good2)
        await d.wait_for_record("handled", event_id=good2["event_id"], outcome="ack")
        dead = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual([m.message_id for m in dead], [bad_env["event_id"]])
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "schema_violation", h)
        self.assertIn("envelope.json", str(h.get("x-death-detail")), h)
        self.assertIn("timestamp", str(h.get("x-death-detail")), h)
        self.assertEqual([r["env"]["EVENT_ID"] for r in self.read_records(rec["exec"][1])],
                         [good["event_id"], good2["event_id"]])
        self.assertTrue(d.running())
        self.assertEqual(await d.stop(), 0)

    # -- all of it -------------------------------------------------------------------

    async def test_daemon_survives_every_bad_input_in_a_row(self):
        cases = [
            ("utf8", b'{"event_type": "good.thing", "payload": {"s": "\xff"}}', "good.thing", "invalid_json"),
            ("notjson", b"}{", "good.thing", "invalid_json"),
            ("array", b"[]", "good.thing", "not_object"),
            ("string", b'"just a string"', "good.thing", "not_object"),
            ("notype", b'{"event_id": "x", "payload": {}}', "", "no_event_type"),
            ("large", json.dumps({"event_type": "good.thing", "pad": "z" * 1500}).encode(), "good.thing",
             "too_large"),
            ("unhandled", b'{"event_type": "nobody.home"}', "nobody.home", "unhandled"),
            ("deep", b'{"event_type": "good.thing", "p": ' + b"[" * 70 + b"]" * 70 + b"}", "good.thing",
             "invalid_json"),
            ("nultype", b'{"event_type": "good\\u0000thing"}', "good.thing", "invalid_json"),
            ("huge", b'{"event_type": "good.thing", "n": -1e400}', "good.thing", "invalid_json"),
            ("empty", b"", "good.thing", "invalid_json"),
        ]
        for mid, body, rk, _ in cases:
            await self.publish_raw(body, rk, message_id="bad-" + mid)
        await self.publish_good_and_wait()
        dead = await self.get_all(self.dlq, expect=len(cases))
        got = {m.message_id: m.headers.get("x-death-reason") for m in dead}
        self.assertEqual(got, {"bad-" + mid: reason for mid, _, _, reason in cases})
        self.assertTrue(all(int(m.headers.get("x-attempts")) == 1 for m in dead))
        self.assertEqual([r["env"]["EVENT_ID"] for r in self.read_records(self.rec["exec"][1])], self.good_ids)
        self.assertEqual(self.daemon.records("retrying later"), [])
        # Still alive, still working.
        self.assertTrue(self.daemon.running())
        await self.publish_good_and_wait()
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0)
        self.assertTrue(self.daemon.running())
        self.assertEqual(await self.daemon.stop(), 0)


if __name__ == "__main__":
    unittest.main()
