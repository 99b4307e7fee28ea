"""`event-router publish`: events from stdin or an NDJSON file reach the
config's exchange with their missing envelope fields filled in and the
documented properties; publisher confirms decide the exit status; an invalid
event (schema, no routing key) publishes nothing; an unroutable event fails."""
import asyncio
import json
import os
import re
import subprocess
import time
import unittest
from datetime import datetime, timezone

import aio_pika

from harness import BINARY, SOURCE_DIR, RouterTestCase

SCHEMAS_DIR = os.path.join(SOURCE_DIR, "config", "schemas", "events")
UUID_V4 = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
ISO_MS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
SUMMARY = r"(?m)^published (\d+) event\(s\), confirmed (\d+)"


def speaker(bucket=True, **extra):
    payload = {"speaker_id": "s-1", "external_id": "ext-1", "name": "Jane"}
    if bucket:
        payload["bucket"] = "GOOD"
    ev = {"event_type": "speaker.onboarded", "aggregate_id": "agg-1", "aggregate_type": "Speaker",
          "payload": payload}
    ev.update(extra)
    return ev


class PublishTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q = self.queue_name("work")
        # The daemon is not running: the test declares the exchange and queue
        # itself, so published events stay in the queue to be inspected.
        self.cfg = self.config([{"name": self.q, "bindings": ["speaker.*", "draft.*", "custom.#"],
                                 "handlers": [{"name": "h", "events": ["#"], "exec": ["/bin/true"]}]}])
        self.config_path = self.write_config(self.cfg)
        self.schema_config_path = self.write_config(dict(self.cfg, schemas=SCHEMAS_DIR), "router-schemas.yaml")
        ch = await self.conn.channel()
        ex = await ch.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(self.q, durable=True)
        for key in ("speaker.*", "draft.*", "custom.#"):
            await q.bind(ex, key)
        await ch.close()

    async def publish_cli(self, *args, stdin=None, config=None, timeout=60):
        argv = [BINARY, "publish", "--config", config or self.config_path, *args]
        p = await asyncio.to_thread(subprocess.run, argv, input=stdin if stdin is not None else "",
                                    capture_output=True, text=True, timeout=timeout, env=self.daemon_env())
        return p

    def assert_summary(self, p, published, confirmed):
        m = re.search(SUMMARY, p.stdout)
        self.assertIsNotNone(m, "no summary line: %r %r" % (p.stdout, p.stderr))
        self.assertEqual((int(m.group(1)), int(m.group(2))), (published, confirmed), p.stdout + p.stderr)

    # -- happy paths ---------------------------------------------------------------

    async def test_single_event_from_stdin_gets_fields_and_properties(self):
        ev = speaker(correlation_id="corr-42")
        before = time.time()
        p = await self.publish_cli(stdin=json.dumps(ev, indent=2) + "\n")  # pretty-printed: one event
        after = time.time()
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_summary(p, 1, 1)
        msgs = await self.get_all(self.q, expect=1)
        self.assertEqual(len(msgs), 1)
        m = msgs[0]
        body = m.json()
        self.assertRegex(body["event_id"], UUID_V4)
        self.assertNotIn("eventId", body)
        self.assertRegex(body["timestamp"], ISO_MS)
        ts = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        self.assertTrue(before - 2 <= ts <= after + 2, (before, ts, after))
        self.assertEqual(body["version"], 1)
        for k, v in ev.items():
            self.assertEqual(body[k], v, "field %s changed" % k)
        self.assertEqual(set(body), set(ev) | {"event_id", "timestamp", "version"})
        # Properties.
        self.assertEqual(m.message_id, body["event_id"])
        self.assertEqual(m.correlation_id, "corr-42")
        self.assertEqual(m.content_type, "application/json")
        self.assertEqual(m.delivery_mode, 2)
        self.assertEqual(m.routing_key, "speaker.onboarded")
        self.assertEqual(m.exchange, self.exchange)
        self.assertIsNotNone(m.timestamp)
        self.assertLessEqual(abs(m.timestamp.replace(tzinfo=timezone.utc).timestamp() - before), 5)

    async def test_ndjson_file_in_order_with_both_styles(self):
        events = [
            speaker(),                                                         # snake: everything filled
            {"eventType": "draft.ingested", "correlationId": "c-camel", "payload": {"n": 1}},  # camel
            {"event_id": "keep-me", "event_type": "draft.ingested", "timestamp": "2020-01-02T03:04:05Z",
             "version": 3, "payload": {"unicode": "h\u00e9 \u2713", "nested": [1, {"x": None}]}},
        ]
        path = os.path.join(self.tmp, "events.ndjson")
        with open(path, "w") as f:
            f.write(json.dumps(events[0]) + "\n\n")       # blank lines are skipped
            f.write(json.dumps(events[1]) + "\r\n")
            f.write("   \n" + json.dumps(events[2], ensure_ascii=False) + "\n")
        p = await self.publish_cli("--file", path)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_summary(p, 3, 3)
        msgs = await self.get_all(self.q, expect=3)
        self.assertEqual(len(msgs), 3)
        b = [m.json() for m in msgs]
        # 1: snake_case, filled.
        self.assertRegex(b[0]["event_id"], UUID_V4)
        self.assertEqual(msgs[0].message_id, b[0]["event_id"])
        self.assertIsNone(msgs[0].correlation_id)
        # 2: camelCase: eventId, not event_id.
        self.assertRegex(b[1]["eventId"], UUID_V4)
        self.assertNotIn("event_id", b[1])
        self.assertRegex(b[1]["timestamp"], ISO_MS)
        self.assertEqual(b[1]["version"], 1)
        self.assertEqual(msgs[1].message_id, b[1]["eventId"])
        self.assertEqual(msgs[1].correlation_id, "c-camel")
        self.assertEqual(msgs[1].routing_key, "draft.ingested")
        # 3: complete already: kept exactly.
        self.assertEqual(b[2], events[2])
        self.assertEqual(msgs[2].message_id, "keep-me")
        self.assertEqual(len({x.get("event_id") or x.get("eventId") for x in b}), 3)
        for m in msgs:
            self.assertEqual(m.content_type, "application/json")
            self.assertEqual(m.delivery_mode, 2)

    async def test_routing_key_option_overrides_the_type(self):
        p = await self.publish_cli("--routing-key", "custom.route", stdin=json.dumps(speaker()))
        self.assertEqual(p.returncode, 0, p.stderr)
        msgs = await self.get_all(self.q, expect=1)
        self.assertEqual(msgs[0].routing_key, "custom.route")
        self.assertEqual(msgs[0].json()["event_type"], "speaker.onboarded")
        # No type at all: the routing key names it (as the daemon reads it).
        p = await self.publish_cli("-k", "custom.typeless", stdin='{"payload": {}}')
        self.assertEqual(p.returncode, 0, p.stderr)
        msgs = await self.get_all(self.q, expect=1)
        self.assertEqual(msgs[0].routing_key, "custom.typeless")

    async def test_a_batch_is_pipelined_and_fully_confirmed(self):
        n = 1000
        lines = "".join(json.dumps({"event_type": "draft.ingested", "payload": {"i": i}}) + "\n" for i in range(n))
        p = await self.publish_cli(stdin=lines)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_summary(p, n, n)
        await self.wait_message_count(self.q, n)
        msgs = await self.get_all(self.q)
        self.assertEqual([m.json()["payload"]["i"] for m in msgs], list(range(n)))
        self.assertEqual(len({m.message_id for m in msgs}), n)

    async def test_published_events_are_handled_by_the_daemon(self):
        rec = self.recorder("rec", events=["speaker.*"])
        q = self.queue_name("handled")
        cfg = self.config([{"name": q, "bindings": ["speaker.*"], "handlers": [rec]}], schemas=SCHEMAS_DIR)
        path = self.write_config(cfg, "daemon.yaml")
        await self.start_daemon(path)
        p = await self.publish_cli(stdin=json.dumps(speaker(correlation_id="c-d")), config=path)
        self.assertEqual(p.returncode, 0, p.stderr)
        recs = await self.wait_records(rec["exec"][1], 1)
        self.assertEqual(recs[0]["env"]["EVENT_TYPE"], "speaker.onboarded")
        self.assertRegex(recs[0]["env"]["EVENT_ID"], UUID_V4)
        self.assertEqual(recs[0]["env"]["CORRELATION_ID"], "c-d")
        self.assertEqual(await self.message_count(q + ".dlq"), 0)

    # -- failures ------------------------------------------------------------------

    async def test_schema_violation_publishes_nothing(self):
        lines = json.dumps(speaker()) + "\n" + json.dumps(speaker(bucket=False)) + "\n" + json.dumps(speaker()) + "\n"
        p = await self.publish_cli(stdin=lines, config=self.schema_config_path)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertRegex(p.stderr, r"line 2: schema violation: speaker\.onboarded\.json: required: .*'bucket'")
        self.assertIn("nothing published", p.stderr)
        self.assertNotIn("line 1", p.stderr)
        self.assertNotIn("line 3", p.stderr)
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(self.q), 0, "an invalid batch published something")
        # The valid ones alone go through with the same config.
        p = await self.publish_cli(stdin=json.dumps(speaker()), config=self.schema_config_path)
        self.assertEqual(p.returncode, 0, p.stderr)
        await self.wait_message_count(self.q, 1)

    async def test_unroutable_event_fails(self):
        lines = json.dumps(speaker()) + "\n" + json.dumps({"event_type": "nobody.listens", "payload": {}}) + "\n"
        p = await self.publish_cli(stdin=lines)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assert_summary(p, 2, 1)
        self.assertRegex(p.stderr, r"line 2: event [0-9a-f-]{36} \(nobody\.listens\).*no queue is bound for "
                                   r"routing key 'nobody\.listens'")
        self.assertNotIn("line 1", p.stderr)
        msgs = await self.get_all(self.q, expect=1)
        self.assertEqual([m.routing_key for m in msgs], ["speaker.onboarded"])

    async def test_missing_type_without_routing_key_is_an_error(self):
        p = await self.publish_cli(stdin=json.dumps(speaker()) + "\n" + '{"payload": {"x": 1}}\n')
        self.assertIn(p.returncode, (1, 2), p.stdout + p.stderr)
        self.assertRegex(p.stderr, r"line 2: no event type .*no --routing-key")
        self.assertIn("nothing published", p.stderr)
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(self.q), 0)

    async def test_bad_input_is_reported_by_line(self):
        p = await self.publish_cli(stdin='{"event_type": "draft.ingested"}\n[1, 2]\n{"event_type": \n')
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stderr, r"line 2: not a JSON object")
        self.assertRegex(p.stderr, r"line 3: invalid JSON")
        self.assertIn("2 of 3 event(s) invalid", p.stderr)
        p = await self.publish_cli(stdin="\n  \n")
        self.assertEqual(p.returncode, 1)
        self.assertIn("no event", p.stderr)
        await asyncio.sleep(0.3)
        self.assertEqual(await self.message_count(self.q), 0)

    async def test_missing_exchange_and_usage_errors(self):
        cfg = dict(self.cfg, exchange={"name": self.prefix + ".nowhere", "type": "topic"})
        p = await self.publish_cli(stdin=json.dumps(speaker()), config=self.write_config(cfg, "nowhere.yaml"))
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stderr, r"exchange '.*\.nowhere' does not exist")
        self.assertNoPasswordLeak(p.stderr)
        for args in (["--bogus"], ["--routing-key"], ["--routing-key", ""], ["--timeout", "x"]):
            p = await self.publish_cli(*args, stdin="{}")
            self.assertEqual(p.returncode, 2, (args, p.stderr))
            self.assertIn("usage: event-router publish", p.stderr)
        p = await self.publish_cli("--file", os.path.join(self.tmp, "missing.ndjson"))
        self.assertEqual(p.returncode, 1)
        self.assertIn("missing.ndjson", p.stderr)
        p = await asyncio.to_thread(subprocess.run, [BINARY, "publish", "--help"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0)
        self.assertIn("--routing-key", p.stdout)


if __name__ == "__main__":
    unittest.main()
