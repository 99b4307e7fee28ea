"""Emit (docs/handlers.md#emit): an exec handler writes follow-up events as
NDJSON on fd 3; the daemon publishes each to the exchange with a derived id,
the inherited correlation id and a causation id, and acks the triggering
event only after every follow-up is confirmed. Unroutable, refused, invalid
and hostile emits each have their outcome; the triggering event is never lost."""
import asyncio
import json
import os
import re
import subprocess
import uuid

from broker_node import free_port, http_get
from harness import BINARY, SOURCE_DIR, RouterTestCase

SCHEMAS = os.path.join(SOURCE_DIR, "config", "schemas", "events")
EMIT_NAMESPACE = uuid.UUID("d86dca4f-d02b-4b6f-8971-eea59d3c94c9")
HANDLER = "emitter"
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def derived_id(event_id: str, handler: str, index: int) -> str:
    """The documented id of an emitted event, computed independently of the daemon."""
    def netstring(s: str) -> str:
        return "%d:%s," % (len(s.encode()), s)
    return str(uuid.uuid5(EMIT_NAMESPACE, netstring(event_id) + netstring(handler) + str(index)))


class EmitTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.follow = self.queue_name("follow")  # bound by the test, not consumed by the daemon

    async def start(self, style=None, schemas=False, retry=None, dedupe=False):
        h = self.recorder(HANDLER, events=["src.#"], timeout="60s")
        if style:
            h["emit"] = {"style": style}
        queue = {"name": self.q, "bindings": ["src.#"], "handlers": [h]}
        if retry:
            queue["retry"] = retry
        if dedupe:
            queue["dedupe"] = {"ttl": "1h"}
        self.http_port = free_port()
        top = {"http": {"listen": "127.0.0.1:%d" % self.http_port}}
        if schemas:
            top["schemas"] = SCHEMAS
        self.cfg_path = self.write_config(self.config([queue], **top))
        self.rec = h["exec"][1]
        self.daemon = await self.start_daemon(self.cfg_path)

    async def bind_follow(self, key="follow.#", arguments=None, queue=None):
        ch = await self.conn.channel()
        q = await ch.declare_queue(queue or self.follow, durable=True, arguments=arguments)
        await q.bind(self.exchange, routing_key=key)
        await ch.close()

    async def dlq_cmd(self, action):
        return await asyncio.to_thread(subprocess.run, [BINARY, "dlq", action, "--queue", self.q, "--config",
                                                        self.cfg_path], capture_output=True, text=True,
                                       timeout=60, env=self.daemon_env(), stdin=subprocess.DEVNULL)

    async def emitted(self):
        """event_router_emitted_events_total of this test's queue, by outcome."""
        _, _, text = await asyncio.to_thread(http_get, "http://127.0.0.1:%d/metrics" % self.http_port)
        rx = re.compile(r'^event_router_emitted_events_total\{([^}]*)\} (\S+)$', re.M)
        out = {}
        for labels, value in rx.findall(text):
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if lab.get("queue") == self.q:
                out[lab["outcome"]] = float(value)
        return out

    async def settled(self):
        await self.wait_queue_counts(self.q, 0, 0, timeout=30)

    def assert_follow_up(self, m, trigger, index, event_type, key=None, style="snake", handler=HANDLER):
        ev = m.json()
        names = {"id": "event_id", "type": "event_type", "corr": "correlation_id", "cause": "causation_id",
                 "agg": "aggregate_id"}
        if style == "camel":
            names = {"id": "eventId", "type": "eventType", "corr": "correlationId", "cause": "causationId",
                     "agg": "aggregateId"}
        want_id = derived_id(trigger["event_id"], handler, index)
        self.assertEqual(ev[names["id"]], want_id)
        self.assertEqual(ev[names["type"]], event_type)
        self.assertEqual(ev[names["corr"]], trigger["correlation_id"])
        self.assertEqual(ev[names["cause"]], trigger["event_id"])
        self.assertEqual(ev["version"], 1)
        self.assertRegex(ev["timestamp"], TIMESTAMP_RE)
        self.assertEqual(m.message_id, want_id)
        self.assertEqual(m.correlation_id, trigger["correlation_id"])
        self.assertEqual(m.content_type, "application/json")
        self.assertEqual(m.delivery_mode, 2)
        self.assertEqual(m.type, event_type)
        self.assertEqual(m.exchange, self.exchange)
        self.assertEqual(m.routing_key, key or event_type)
        return ev

    # -- tests ---------------------------------------------------------------------

    async def test_follow_ups_published_once_with_derived_ids(self):
        await self.start()
        await self.bind_follow()
        ev = self.make_event("src.created", {"emit": [
            {"event_type": "follow.created", "aggregate_id": "d-1", "aggregate_type": "Draft",
             "payload": {"dfn": "x", "n": [1, 2]}},
            {"event_type": "follow.other", "routing_key": "follow.custom.key"},
        ]})
        await self.publish(ev)
        got = await self.get_all(self.follow, expect=2)
        await self.settled()
        self.assertEqual(len(got), 2)
        by_type = {m.type: m for m in got}
        first = self.assert_follow_up(by_type["follow.created"], ev, 0, "follow.created")
        self.assertEqual(first["aggregate_id"], "d-1")
        self.assertEqual(first["aggregate_type"], "Draft")
        self.assertEqual(first["payload"], {"dfn": "x", "n": [1, 2]})
        second = self.assert_follow_up(by_type["follow.other"], ev, 1, "follow.other", key="follow.custom.key")
        self.assertEqual(second["payload"], {})
        self.assertNotIn("aggregate_id", second)
        self.assertEqual(await self.message_count(self.dlq), 0)
        # Once: nothing more arrives.
        await asyncio.sleep(0.5)
        self.assertEqual(await self.get_all(self.follow), [])
        # A correlation id is inherited from the event id when there is none.
        ev2 = self.make_event("src.created", {"emit": [{"event_type": "follow.created"}]})
        del ev2["correlation_id"]
        await self.publish(ev2)
        [m] = await self.get_all(self.follow, expect=1)
        self.assertEqual(m.json()["correlation_id"], ev2["event_id"])
        self.assertEqual(m.correlation_id, ev2["event_id"])
        await self.settled()
        self.assertEqual(await self.emitted(), {"confirmed": 3})

    async def test_camel_style(self):
        await self.start(style="camel")
        await self.bind_follow()
        ev = self.make_event("src.created", {"emit": [{"event_type": "follow.created", "aggregate_id": "d-9"}]})
        await self.publish(ev)
        [m] = await self.get_all(self.follow, expect=1)
        body = self.assert_follow_up(m, ev, 0, "follow.created", style="camel")
        self.assertEqual(body["aggregateId"], "d-9")
        for snake in ("event_id", "event_type", "correlation_id", "causation_id", "aggregate_id"):
            self.assertNotIn(snake, body)
        await self.settled()

    async def test_retried_handler_emits_the_same_id_once(self):
        # Attempt 1 writes its emits and exits 75: nothing is published; attempt 2
        # writes the same emits and exits 0: they go out, with the same ids.
        await self.start(retry={"max_attempts": 3, "delay": "100ms", "max_delay": "200ms"})
        await self.bind_follow()
        ev = self.make_event("src.created", {"fail_attempts": 1, "emit": [{"event_type": "follow.created"}]})
        await self.publish(ev)
        recs = await self.wait_records(self.rec, 2, timeout=30)
        self.assertEqual([r["env"]["ATTEMPT"] for r in recs], ["1", "2"])
        [m] = await self.get_all(self.follow, expect=1)
        self.assert_follow_up(m, ev, 0, "follow.created")
        await self.settled()
        await asyncio.sleep(0.5)
        self.assertEqual(await self.get_all(self.follow), [])
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_ack_waits_for_the_confirm(self):
        # The follow-up queue refuses new messages while full (reject-publish):
        # the broker nacks the emit, so the original must not be acked; it comes
        # back and runs again, and goes through once there is room, with the same id.
        # With dedupe on, the handler's success counts only once its emits are
        # confirmed: the event that comes back is run, not skipped as a duplicate.
        await self.start(dedupe=True)
        await self.bind_follow(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        await self.publish_raw(b'{"filler": true}', "follow.filler")
        await self.wait_message_count(self.follow, 1)
        ev = self.make_event("src.created", {"emit": [{"event_type": "follow.created"}]})
        await self.publish(ev)
        await self.daemon.wait_for_log(r"the broker refused an emitted event", timeout=30)
        info = await self.queue_info(self.q)
        self.assertEqual(info["messages_ready"] + info["messages_unacknowledged"], 1, "the original was acked")
        recs = await self.wait_records(self.rec, 2, timeout=30)  # handed back and run again
        self.assertEqual(recs[1]["env"]["REDELIVERED"], "1")
        # Make room: the next run's emit is confirmed and the original acked.
        [filler] = await self.get_all(self.follow)
        self.assertEqual(filler.routing_key, "follow.filler")
        [m] = await self.get_all(self.follow, expect=1, timeout=30)
        self.assert_follow_up(m, ev, 0, "follow.created")
        await self.settled()
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_unroutable_emit_dead_letters_and_replay_reemits_same_ids(self):
        await self.start()
        await self.bind_follow()
        ev = self.make_event("src.created", {"emit": [
            {"event_type": "follow.created"},
            {"event_type": "nobody.listens", "payload": {"a": 1}},
        ]})
        await self.publish(ev)
        await self.wait_message_count(self.dlq, 1, timeout=30)
        await self.settled()
        # Left in the DLQ for the replay: its reason and detail from `dlq list`
        # and the daemon's log line (the same text as x-death-detail).
        p = await self.dlq_cmd("list")
        self.assertIn("emit_unroutable", p.stdout)
        self.assertIn(ev["event_id"], p.stdout)
        [rec] = await self.daemon.wait_for_record("dead-lettering", reason="emit_unroutable")
        detail = rec.fields["detail"]
        self.assertIn("emit[1] (nobody.listens, id %s)" % derived_id(ev["event_id"], HANDLER, 1), detail)
        self.assertIn("routing key 'nobody.listens' on exchange '%s'" % self.exchange, detail)
        # The routable one went out (a replay sends it again, same id: consumers dedupe).
        [m] = await self.get_all(self.follow, expect=1)
        self.assert_follow_up(m, ev, 0, "follow.created")

        # Bind the missing key and replay: the handler runs again and emits
        # both, with the same ids.
        other = self.queue_name("nobody")
        await self.bind_follow(key="nobody.#", queue=other)
        p = await self.dlq_cmd("replay")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        [again] = await self.get_all(self.follow, expect=1, timeout=30)
        self.assertEqual(again.message_id, m.message_id)
        [n] = await self.get_all(other, expect=1, timeout=30)
        self.assert_follow_up(n, ev, 1, "nobody.listens")
        await self.settled()
        self.assertEqual(await self.emitted(), {"confirmed": 3, "returned": 1})
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_invalid_emit_publishes_nothing(self):
        await self.start(schemas=True)
        await self.bind_follow(key="#")
        # speaker.onboarded's schema requires payload fields: emit[1] fails it,
        # so emit[0], valid, is not published either.
        ev = self.make_event("src.created", {"emit": [
            {"event_type": "rag.dfn_generated", "payload": {"dfn": "x"}},
            {"event_type": "speaker.onboarded", "payload": {}},
        ]})
        await self.publish(ev)
        [dead] = await self.get_all(self.dlq, expect=1, timeout=30)
        await self.settled()
        self.assertEqual(dead.headers["x-death-reason"], "emit_invalid")
        self.assertRegex(dead.headers["x-death-detail"],
                         r"^emit\[1\] \(speaker\.onboarded\): schema violation: speaker\.onboarded\.json: ")
        got = await self.get_all(self.follow)
        self.assertEqual([m.routing_key for m in got], ["src.created"], "only the original itself (bound '#')")
        # A valid emit of the same handler goes out.
        ok = self.make_event("src.created", {"emit": [{"event_type": "rag.dfn_generated", "payload": {"d": 1}}]})
        await self.publish(ok)
        got = await self.get_all(self.follow, expect=2)
        self.assertEqual(sorted(m.routing_key for m in got), ["rag.dfn_generated", "src.created"])
        await self.settled()

    async def test_hostile_handler_output_on_fd3(self):
        await self.start()
        await self.bind_follow()
        cases = [
            ({"emit_raw": "not json\n"}, r"^emit\[0\]: invalid JSON"),
            ({"emit_raw": "[1,2,3]\n{\"event_type\":\"follow.x\"}\n"}, r"^emit\[0\]: not a JSON object"),
            ({"emit_raw": "{\"event_type\":\"follow.x\",\"payload\":\"str\"}\n"},
             r"^emit\[0\] \(follow\.x\): 'payload' must be a JSON object"),
            ({"emit_raw": "{\"event_type\":\"follow.x\",\"event_id\":\"forged\"}\n"},
             r"^emit\[0\]: 'event_id' is the daemon's to set"),
            ({"emit_raw": "{\"event_type\":\"" + "t" * 300 + "\"}\n"}, r"^emit\[0\]: 'event_type' must be"),
            ({"emit_raw": "\xff\xfe garbage \x00\n"}, r"^emit\[0\]: invalid JSON"),
            ({"emit_big": 10 * 1000 * 1000},
             r"^emit\[0\] \(follow\.big\): the event is \d+ bytes, over max_message_bytes 1048576$"),
            ({"emit_raw": "x", "emit_raw_repeat": 20 * 1024 * 1024},
             r"^more than 16777216 bytes of emitted events on fd 3$"),
            ({"emit_raw": "{\"event_type\":\"follow.x\"}\n", "emit_raw_repeat": 5000},
             r"^more than 1000 emitted events on fd 3$"),
        ]
        events = []
        for payload, _ in cases:
            ev = self.make_event("src.hostile", payload)
            events.append(ev)
            await self.publish(ev)
        good = self.make_event("src.created", {"emit": [{"event_type": "follow.after"}]})
        await self.publish(good)
        dead = await self.get_all(self.dlq, expect=len(cases), timeout=60)
        [m] = await self.get_all(self.follow, expect=1, timeout=30)
        self.assert_follow_up(m, good, 0, "follow.after")
        await self.settled()
        self.assertEqual(len(dead), len(cases))
        by_id = {json.loads(d.body)["event_id"]: d for d in dead}
        for ev, (_, pattern) in zip(events, cases):
            d = by_id[ev["event_id"]]
            self.assertEqual(d.headers["x-death-reason"], "emit_invalid")
            self.assertRegex(d.headers["x-death-detail"], pattern)
        self.assertEqual(await self.get_all(self.follow), [], "no hostile emit was published")
        # `invalid` counts emit objects: 8 in the first seven cases; a cap exceeded
        # on fd 3 ends the run with emit_invalid before any emit object exists.
        self.assertEqual(await self.emitted(), {"confirmed": 1, "invalid": 8})
        self.assertTrue(self.daemon.running())


if __name__ == "__main__":
    import unittest
    unittest.main()
