"""Events from Python (aio-pika, snake_case) and Node (amqplib, camelCase)
publishers reach the right handler exactly once, with the right fields."""
import asyncio
import json
import re
import unittest

from harness import RouterTestCase

EXPECTED_ENV_KEYS = {"PATH", "EVENT_TYPE", "EVENT_ID", "CORRELATION_ID", "AGGREGATE_ID", "ROUTING_KEY", "QUEUE",
                     "ATTEMPT", "REDELIVERED", "ER_EMIT_FD"}


class FlowTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q_speaker = self.queue_name("speaker")
        self.q_draft = self.queue_name("draft")
        self.plugin_prefix = "pfx-" + self.prefix
        self.rec = self.recorder("speaker-rec", events=["speaker.*"], env={"HANDLER_FOO": "bar baz"},
                                 inherit_env=["INHERITED_VAR"], timeout="20s")
        self.record_path = self.rec["exec"][1]
        cfg = self.config([
            {"name": self.q_speaker, "bindings": ["speaker.*"], "prefetch": 10, "unhandled": "dead-letter",
             "handlers": [self.rec]},
            {"name": self.q_draft, "bindings": ["draft.*"], "prefetch": 10, "unhandled": "dead-letter",
             "handlers": [{"name": "draft-log", "events": ["draft.*"], "plugin": "liblog_plugin.so",
                           "config": {"prefix": self.plugin_prefix}}]},
        ])
        self.daemon = await self.start_daemon(self.write_config(cfg), env={
            "INHERITED_VAR": "inherited-value", "SECRET_TOKEN": "hunter2-must-not-leak"})

    async def assert_drained(self):
        for q in (self.q_speaker, self.q_draft):
            await self.wait_queue_counts(q, ready=0, unacked=0)
        for q in (self.q_speaker + ".dlq", self.q_draft + ".dlq"):
            self.assertEqual(await self.message_count(q), 0, "unexpected dead letters in " + q)

    def check_exec_record(self, rec, *, event_type, event_id, correlation_id, aggregate_id, routing_key, body):
        env = rec["env"]
        self.assertEqual(set(env), EXPECTED_ENV_KEYS | {"INHERITED_VAR", "HANDLER_FOO"},
                         "handler environment is not exactly the documented set")
        self.assertTrue(env["PATH"])
        self.assertEqual(env["EVENT_TYPE"], event_type)
        self.assertEqual(env["EVENT_ID"], event_id)
        self.assertEqual(env["CORRELATION_ID"], correlation_id)
        self.assertEqual(env["AGGREGATE_ID"], aggregate_id)
        self.assertEqual(env["ROUTING_KEY"], routing_key)
        self.assertEqual(env["QUEUE"], self.q_speaker)
        self.assertEqual(env["ATTEMPT"], "1")
        self.assertEqual(env["REDELIVERED"], "0")
        self.assertEqual(env["ER_EMIT_FD"], "3")
        self.assertEqual(env["HANDLER_FOO"], "bar baz")
        self.assertEqual(env["INHERITED_VAR"], "inherited-value")
        self.assertNotIn("SECRET_TOKEN", env)
        self.assertEqual(rec["body"], body, "body on stdin differs from the published body")
        self.assertEqual(rec["argv"][1:], self.rec["exec"][1:], "argv not passed as configured")

    async def test_snake_case_events_from_aio_pika_reach_exec_handler_once(self):
        events = [self.make_event("speaker.onboarded", {"speaker_id": "123", "external_id": "ext-123",
                                                        "name": "John Doe", "bucket": "GOOD"}),
                  self.make_event("speaker.updated", {"speaker_id": "123", "note": "ünïcödé ✓"})]
        bodies = [await self.publish(e) for e in events]
        recs = await self.wait_records(self.record_path, 2)
        # Exactly once: nothing more arrives once the queue has drained.
        await self.assert_drained()
        await asyncio.sleep(0.5)
        recs = self.read_records(self.record_path)
        self.assertEqual(len(recs), 2, [r["env"].get("EVENT_ID") for r in recs])
        by_id = {r["env"]["EVENT_ID"]: r for r in recs}
        for ev, body in zip(events, bodies):
            self.assertIn(ev["event_id"], by_id)
            self.check_exec_record(by_id[ev["event_id"]], event_type=ev["event_type"], event_id=ev["event_id"],
                                   correlation_id=ev["correlation_id"], aggregate_id=ev["aggregate_id"],
                                   routing_key=ev["event_type"], body=body.decode())
            handled = await self.daemon.wait_for_record("handled", event_id=ev["event_id"])
            self.assertEqual(len(handled), 1, [h.line for h in handled])
            h = handled[0].fields
            self.assertEqual(h.get("queue"), self.q_speaker)
            self.assertEqual(h.get("event_type"), ev["event_type"])
            self.assertEqual(h.get("handler"), "speaker-rec")
            self.assertEqual(h.get("outcome"), "ack")
            self.assertRegex(h.get("duration_ms", ""), r"^\d+(\.\d+)?$")
        self.assertEqual(await self.daemon.stop(), 0)
        self.assertNoPasswordLeak(self.daemon.log())
        self.assertNotIn("hunter2-must-not-leak", self.daemon.log())

    async def test_camel_case_events_from_amqplib_reach_exec_handler_once(self):
        events = [self.make_camel_event("speaker.updated", {"speaker_id": "123", "name": "Jane Doe"}),
                  self.make_camel_event("speaker.bucket_reassigned", {"speaker_id": "123", "bucket": "BAD"})]
        published = await self.publish_camel(events)
        self.assertEqual(len(published), 2)
        await self.wait_records(self.record_path, 2)
        await self.assert_drained()
        await asyncio.sleep(0.5)
        recs = self.read_records(self.record_path)
        self.assertEqual(len(recs), 2, [r["env"].get("EVENT_ID") for r in recs])
        by_id = {r["env"]["EVENT_ID"]: r for r in recs}
        for ev, pub in zip(events, published):
            self.assertIn(ev["eventId"], by_id)
            self.check_exec_record(by_id[ev["eventId"]], event_type=ev["eventType"], event_id=ev["eventId"],
                                   correlation_id=ev["correlationId"], aggregate_id=ev["aggregateId"],
                                   routing_key=ev["eventType"], body=pub["body"])
            self.assertEqual(json.loads(by_id[ev["eventId"]]["body"])["eventId"], ev["eventId"])
            rec = await self.daemon.wait_for_record("handled", event_id=ev["eventId"])
            self.assertEqual(rec[0].fields.get("outcome"), "ack")
            self.assertEqual(rec[0].fields.get("event_type"), ev["eventType"])
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_burst_is_handled_exactly_once(self):
        events = [self.make_event("speaker.updated", {"n": i}) for i in range(30)]
        for e in events:
            await self.publish(e)
        await self.wait_records(self.record_path, len(events), timeout=60)
        await self.assert_drained()
        await asyncio.sleep(0.5)
        ids = [r["env"]["EVENT_ID"] for r in self.read_records(self.record_path)]
        self.assertEqual(sorted(ids), sorted(e["event_id"] for e in events))
        self.assertEqual(len(self.daemon.records("handled", queue=self.q_speaker, outcome="ack")), len(events))
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_handler_logs_both_envelope_styles(self):
        snake = self.make_event("draft.ingested", {"draft_id": "d-1"})
        await self.publish(snake)
        camel = self.make_camel_event("draft.correction_vector_created", {"draft_id": "d-2"})
        await self.publish_camel([camel])
        for ev_type, ev_id, cid in ((snake["event_type"], snake["event_id"], snake["correlation_id"]),
                                    (camel["eventType"], camel["eventId"], camel["correlationId"])):
            await self.daemon.wait_for_log(re.escape(
                "%s handled %s id=%s correlation_id=%s routing_key=%s attempt=1" % (
                    self.plugin_prefix, ev_type, ev_id, cid, ev_type)))
            handled = await self.daemon.wait_for_record("handled", event_id=ev_id)
            self.assertEqual(handled[0].fields.get("handler"), "draft-log")
            self.assertEqual(handled[0].fields.get("queue"), self.q_draft)
            self.assertEqual(handled[0].fields.get("outcome"), "ack")
        await self.assert_drained()
        log = self.daemon.log()
        self.assertEqual(log.count("%s handled draft.ingested id=%s " % (self.plugin_prefix, snake["event_id"])), 1)
        self.assertEqual(log.count("%s handled %s id=%s " % (self.plugin_prefix, camel["eventType"],
                                                              camel["eventId"])), 1)
        # The exec handler of the other queue saw none of these.
        self.assertEqual(self.read_records(self.record_path), [])
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_event_type_falls_back_to_routing_key(self):
        ev = self.make_event(None, {"speaker_id": "9"})
        self.assertNotIn("event_type", ev)
        body = await self.publish(ev, routing_key="speaker.updated")
        recs = await self.wait_records(self.record_path, 1)
        self.assertEqual(recs[0]["env"]["EVENT_TYPE"], "speaker.updated")
        self.assertEqual(recs[0]["env"]["ROUTING_KEY"], "speaker.updated")
        self.assertEqual(recs[0]["env"]["EVENT_ID"], ev["event_id"])
        self.assertEqual(recs[0]["body"], body.decode())
        handled = await self.daemon.wait_for_record("handled", event_id=ev["event_id"])
        self.assertEqual(handled[0].fields.get("event_type"), "speaker.updated")
        await self.assert_drained()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_envelope_event_type_wins_over_routing_key(self):
        # Published under a key the queue binds, but the envelope names another type.
        ev = self.make_event("speaker.onboarded")
        await self.publish(ev, routing_key="speaker.legacy_key")
        recs = await self.wait_records(self.record_path, 1)
        self.assertEqual(recs[0]["env"]["EVENT_TYPE"], "speaker.onboarded")
        self.assertEqual(recs[0]["env"]["ROUTING_KEY"], "speaker.legacy_key")
        await self.assert_drained()
        self.assertEqual(await self.daemon.stop(), 0)


if __name__ == "__main__":
    unittest.main()
