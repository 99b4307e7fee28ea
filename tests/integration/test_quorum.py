"""Quorum queues end to end (`type: quorum`, docs/scaling.md), on the shared
single-node broker (quorum queues work on one node):

- the work queue, its DLQ and its delay queues are declared quorum, with the
  arguments the docs list (rabbitmqctl list_queues), and redeclared as they are;
- a retried event goes through the quorum delay queue and back (attempt 2);
- a message handed back more often than `delivery_limit` (here: the daemon
  SIGKILLed while its handler runs) is dead-lettered by the broker into the
  DLQ with `x-death`; `dlq list` shows `delivery_limit`, `dlq replay
  --to-queue` puts it back without the broker's headers;
- a classic queue redeclared as quorum fails with a message that points to
  the migration procedure.
"""
import asyncio
import datetime
import os
import subprocess
import time
import unittest

import aio_pika

from harness import BINARY, RouterTestCase, rabbitmqctl_json


def args_of(row):
    a = row.get("arguments") or []
    return {x[0]: x[-1] for x in a} if isinstance(a, list) else dict(a)


class QuorumTest(RouterTestCase):

    def quorum_queue(self, short, handlers, **extra):
        q = {"name": self.queue_name(short), "bindings": ["%s.*" % short], "type": "quorum",
             "handlers": handlers}
        q.update(extra)
        return q

    async def queue_rows(self):
        rows = await asyncio.to_thread(rabbitmqctl_json, "list_queues", "name", "type", "durable", "arguments")
        return {r["name"]: r for r in rows if str(r.get("name", "")).startswith(self.prefix)}

    async def dlq_cmd(self, config_path, *args):
        argv = [BINARY, "dlq", *args, "--config", config_path]
        p = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout, p.stderr

    async def test_work_dlq_and_delay_queues_are_quorum_with_at_least_once_dead_lettering(self):
        q = self.quorum_queue("qa", [self.recorder("rec")], delivery_limit=7,
                              retry={"max_attempts": 3, "delay": "200ms", "multiplier": 2, "max_delay": "400ms"},
                              dead_letter_arguments={"x-max-length": 1000})
        path = self.write_config(self.config([q]))
        d = await self.start_daemon(path)
        rows = await self.queue_rows()
        name, dlq = q["name"], q["name"] + ".dlq"
        delay = [name + ".retry.200", name + ".retry.400"]
        self.assertEqual(sorted(rows), sorted([name, dlq] + delay), rows)
        for n in rows:
            self.assertEqual(rows[n]["type"], "quorum", rows[n])
            self.assertTrue(rows[n]["durable"], rows[n])
        self.assertEqual(args_of(rows[name]), {
            "x-queue-type": "quorum", "x-delivery-limit": 7, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish"})
        self.assertEqual(args_of(rows[dlq]), {"x-queue-type": "quorum", "x-max-length": 1000})
        for n in delay:
            self.assertEqual(args_of(rows[n]), {
                "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": name,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        # Redeclared as they are on a restart (no argument mismatch).
        self.assertEqual(await d.stop(), 0, d.tail())
        d2 = await self.start_daemon(path)
        self.assertEqual(await d2.stop(), 0, d2.tail())
        # --check shows the type.
        p = await asyncio.to_thread(subprocess.run, [BINARY, "--check", "--config", path], capture_output=True,
                                    text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("queue %s (durable, quorum, delivery_limit 7)" % name, p.stdout)

    async def test_retry_goes_through_the_quorum_delay_queue_and_back(self):
        rec = self.record_file("retry")
        q = self.quorum_queue("qr", [self.recorder("rec", record=rec)],
                              retry={"max_attempts": 3, "delay": "300ms", "multiplier": 1, "max_delay": "300ms"})
        d = await self.start_daemon(self.write_config(self.config([q])))
        ev = self.make_event("qr.created", {"fail_attempts": 1})
        await self.publish(ev)
        recs = await self.wait_records(rec, 2, timeout=30)
        self.assertEqual([r["env"].get("ATTEMPT") for r in recs], ["1", "2"], recs)
        self.assertGreaterEqual(recs[1]["time"] - recs[0]["time"], 0.3)  # it waited in the delay queue
        # The second attempt succeeded: nothing left anywhere.
        for n in (q["name"], q["name"] + ".retry.300", q["name"] + ".dlq"):
            await self.wait_queue_counts(n, 0, 0)
        self.assertEqual(await d.stop(), 0, d.tail())
        self.assertEqual(len(self.read_records(rec)), 2)

    async def test_delivery_limit_dead_letters_into_the_dlq_and_dlq_understands_it(self):
        rec = self.record_file("limit")
        # The handler sleeps; the daemon is SIGKILLed under it, so each time the
        # broker gets the delivery back (a hand-back like a closed channel).
        q = self.quorum_queue("ql", [self.recorder("rec", record=rec)], delivery_limit=2)
        path = self.write_config(self.config([q]))
        ev = self.make_event("ql.created", {"sleep": 60})
        for n in range(1, 4):  # deliveries 1, 2, 3: returned 3 times > limit 2
            d = await self.start_daemon(path)
            if n == 1:
                await self.publish(ev)
            await self.wait_records(rec, n, timeout=30)
            d.kill()
        dlq = q["name"] + ".dlq"
        await self.wait_message_count(dlq, 1, timeout=30)
        self.assertEqual(await self.message_count(q["name"]), 0)
        self.assertEqual(len(self.read_records(rec)), 3)

        rc, out, err = await self.dlq_cmd(path, "list", "--queue", q["name"])
        self.assertEqual(rc, 0, out + err)
        lines = [line for line in out.splitlines() if ev["event_id"] in line]
        self.assertEqual(len(lines), 1, out)
        self.assertIn("delivery_limit", lines[0])
        self.assertIn("ql.created", lines[0])
        self.assertIn("by the broker (x-death) from queue 'it-", lines[0])

        # Read it as the broker made it (and put it back: basic.get, no ack, close).
        ch = await self.conn.channel()
        m = await (await ch.get_queue(dlq)).get(no_ack=False)
        deaths = m.headers.get("x-death")
        self.assertEqual(deaths[0]["reason"], "delivery_limit", deaths)
        self.assertEqual(deaths[0]["queue"], q["name"], deaths)
        self.assertNotIn("x-death-reason", m.headers)
        await ch.close()

        rc, out, err = await self.dlq_cmd(path, "replay", "--queue", q["name"], "--to-queue")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("replayed 1 event(s)", out)
        got = await self.get_all(q["name"], expect=1)
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0].json()["event_id"], ev["event_id"])
        self.assertNotIn("x-death", got[0].headers)
        self.assertEqual(await self.message_count(dlq), 0)

    async def test_dlq_reads_forged_or_malformed_x_death_headers_safely(self):
        # x-death is a header any publisher can set: list shows what it can,
        # replay uses it only as it would x-original-*, nothing crashes.
        name = self.queue_name("fx")
        path = self.write_config(self.config([{"name": name, "bindings": ["fx.*"],
                                                "handlers": [self.recorder("rec")]}]))
        ch = await self.conn.channel(publisher_confirms=True)
        await ch.declare_queue(name, durable=True)
        await ch.declare_queue(name + ".dlq", durable=True)
        good = self.make_event("fx.created")
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        bodies = [
            (good, [{"reason": "delivery_limit", "queue": name, "count": 3, "time": when,
                     "exchange": self.exchange, "routing-keys": ["fx.created"]}]),
            (self.make_event("fx.created"), ["not a table", 5]),
            (self.make_event("fx.created"), []),
            (self.make_event("fx.created"), "a string"),
            (self.make_event("fx.created"), [{"reason": 7, "routing-keys": "x", "count": "many"}]),
        ]
        for ev, death in bodies:
            await ch.default_exchange.publish(
                aio_pika.Message(body=__import__("json").dumps(ev).encode(), message_id=ev["event_id"],
                                 headers={"x-death": death}), routing_key=name + ".dlq")
        await ch.close()
        rc, out, err = await self.dlq_cmd(path, "list", "--queue", name)
        self.assertEqual(rc, 0, out + err)
        rows = {ev["event_id"]: line for ev, _ in bodies for line in out.splitlines() if ev["event_id"] in line}
        self.assertEqual(len(rows), 5, out)
        self.assertIn("delivery_limit", rows[good["event_id"]])
        self.assertIn("2026-01-02T03:04:05.000Z", rows[good["event_id"]])
        for ev, _ in bodies[1:]:
            self.assertNotIn("by the broker", rows[ev["event_id"]])
        rc, out, err = await self.dlq_cmd(path, "replay", "--queue", name, "--to-queue")
        self.assertEqual(rc, 1, out + err)
        self.assertIn("replayed event %s (fx.created) into queue '%s'" % (good["event_id"], name), out)
        self.assertIn("4 event(s) not replayed", err)
        self.assertEqual(err.count("header (nor x-death)"), 4, err)
        got = await self.get_all(name, expect=1)
        self.assertEqual([m.json()["event_id"] for m in got], [good["event_id"]])
        self.assertNotIn("x-death", got[0].headers)

    async def test_classic_queue_redeclared_as_quorum_points_to_the_migration(self):
        name = self.queue_name("qc")
        ch = await self.conn.channel()
        await ch.declare_queue(name, durable=True)
        await ch.close()
        q = {"name": name, "bindings": ["qc.*"], "type": "quorum", "handlers": [self.recorder("rec")]}
        d = await self.start_daemon(self.write_config(self.config([q])), wait_ready=False)
        rc = await d.wait_exit(30)
        self.assertIsNotNone(rc, "daemon still running after the type mismatch:\n" + d.tail())
        self.assertNotEqual(rc, 0)
        # RabbitMQ names the first argument that differs (x-dead-letter-exchange on 3.10).
        lines = [line for line in d.lines() if name in line and "already exists" in line]
        self.assertTrue(lines, d.tail())
        self.assertIn("Migrating a queue to quorum", lines[-1])
        self.assertIn("docs/scaling.md", lines[-1])
        rows = await self.queue_rows()
        self.assertEqual(rows[name]["type"], "classic")  # left alone


if __name__ == "__main__":
    unittest.main()
