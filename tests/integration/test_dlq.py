"""`event-router dlq list|replay`: inspect the dead-letter queue without
changing it, replay events (all, by id, or N) to the config's exchange (or
--to-queue, the queue they failed in) with the failure headers removed, and
leave an event in the DLQ when its replay fails or is not routed."""
import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import uuid

import aio_pika

from harness import AMQP_URL, BINARY, HERE, RECORD_HANDLER, RouterTestCase, ensure_node_modules, run_check

FAILURE_HEADERS = ("x-death-reason", "x-death-detail", "x-death-handler", "x-attempts", "x-first-failed-at",
                   "x-last-failed-at", "x-original-exchange", "x-original-routing-key", "x-original-queue",
                   "x-attempt", "x-last-error")


def is_failure_header(name: str) -> bool:
    return name in FAILURE_HEADERS or name.startswith(("x-death", "x-original-"))


class DlqTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.queue = self.queue_name("work")
        self.dlq = self.queue + ".dlq"
        self.flag = os.path.join(self.tmp, "handler-ok")
        self.rec = self.record_file("flaky")
        # Fails (exit 3, a retry verdict) until the flag file exists, then records the event.
        self.script = os.path.join(self.tmp, "flaky.sh")
        with open(self.script, "w") as f:
            f.write(textwrap.dedent("""\
                #!/bin/sh
                if [ -e '%s' ]; then exec '%s' '%s'; fi
                cat >/dev/null
                echo "not ready yet" >&2
                exit 3
                """ % (self.flag, RECORD_HANDLER, self.rec)))
        os.chmod(self.script, os.stat(self.script).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        queue = {"name": self.queue, "bindings": ["dlqt.#"], "prefetch": 10,
                 "handlers": [{"name": "flaky", "events": ["#"], "exec": [self.script], "timeout": "20s"}]}
        # With delayed retries (when the config takes `retry:`), keep them short.
        with_retry = dict(queue, retry={"max_attempts": 2, "delay": "100ms", "max_delay": "200ms"})
        probe = self.write_config(self.config([with_retry]), "probe.yaml")
        self.retries = (await asyncio.to_thread(run_check, probe)).returncode == 0
        self.cfg_path = self.write_config(self.config([with_retry if self.retries else queue]))

    # -- helpers -----------------------------------------------------------------

    async def dlq_cmd(self, *args, env=None, config=True):
        argv = [BINARY, "dlq", *args]
        if config:
            argv += ["--config", self.cfg_path]
        e = self.daemon_env(env)
        p = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, env=e, timeout=60,
                                    stdin=subprocess.DEVNULL)
        self.assertNoPasswordLeak(p.stdout + p.stderr)
        return p

    def parse_list(self, out: str):
        """Rows of `dlq list` as dicts, and the total line."""
        lines = out.splitlines()
        self.assertTrue(lines and lines[0].startswith("EVENT ID"), out)
        rows = []
        for line in lines[1:]:
            if line.startswith("total:"):
                return rows, line
            cols = re.split(r"\s{2,}", line, maxsplit=5)
            rows.append(dict(zip(("id", "type", "reason", "attempts", "when", "detail"), cols)))
        self.fail("no total line in:\n" + out)

    async def listed_ids(self):
        p = await self.dlq_cmd("list", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stderr)
        rows, _ = self.parse_list(p.stdout)
        return [r["id"] for r in rows]

    async def dead_letter_three(self):
        """Runs the daemon with the failing handler until 3 events are in the
        DLQ. Returns the events and their ids in DLQ order (concurrent handlers
        and retries may reorder them)."""
        daemon = await self.start_daemon(self.cfg_path)
        events = [self.make_event("dlqt.created", {"n": i}) for i in range(3)]
        for ev in events:
            await self.publish(ev, headers={"app-header": "keep-me"})
        await self.wait_message_count(self.dlq, 3, timeout=60)
        self.assertEqual(await daemon.stop(), 0)
        ids = await self.listed_ids()
        self.assertEqual(sorted(ids), sorted(e["event_id"] for e in events))
        return events, ids

    async def declare_topology(self):
        """Starts and stops the daemon once: the work queue and its DLQ exist, empty."""
        daemon = await self.start_daemon(self.cfg_path)
        self.assertEqual(await daemon.stop(), 0)

    async def put_in_dlq(self, headers, event_type="dlqt.created"):
        """Puts a dead-lettered event into the DLQ directly, with the given
        x-original-* headers (as the daemon would, or forged). Returns its id."""
        ev = self.make_event(event_type, {"crafted": True})
        hdrs = {"x-death-reason": "handler_failed", "x-attempts": 1, "x-app-header": "keep-me"}
        hdrs.update(headers)
        ch = await self.conn.channel(publisher_confirms=True)
        await ch.default_exchange.publish(
            aio_pika.Message(body=json.dumps(ev).encode(), content_type="application/json",
                             message_id=ev["event_id"], headers=hdrs,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.dlq, mandatory=True)
        await ch.close()
        return ev["event_id"]

    async def other_exchange(self, queue_short: str):
        """Another exchange (not the config's) with a queue bound to every key."""
        name = self.prefix + ".other"
        q = self.queue_name(queue_short)
        ch = await self.conn.channel()
        ex = await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=False)
        queue = await ch.declare_queue(q, durable=False)
        await queue.bind(ex, "#")
        await ch.close()

        async def drop():
            ch = await self.conn.channel()
            await ch.exchange_delete(name)
            await ch.close()
        self.addAsyncCleanup(drop)
        return name, q

    async def tap(self, routing_key: str = "dlqt.#") -> str:
        """A queue bound to the test exchange that sees what replay publishes."""
        name = self.queue_name("tap")
        ch = await self.conn.channel()
        q = await ch.declare_queue(name, durable=False)
        await q.bind(self.exchange, routing_key)
        await ch.close()
        return name

    # -- tests -------------------------------------------------------------------

    async def test_list_is_non_destructive_and_replay_by_id_count_and_all(self):
        events, ids = await self.dead_letter_three()

        p = await self.dlq_cmd("list", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stderr)
        rows, total = self.parse_list(p.stdout)
        self.assertEqual([r["id"] for r in rows], ids, p.stdout)
        for r in rows:
            self.assertEqual(r["type"], "dlqt.created", r)
            # Exit 3 is a retry verdict: with delayed retries it ends as max_attempts.
            self.assertEqual(r["reason"], "max_attempts" if self.retries else "handler_failed", r)
            self.assertEqual(r["attempts"], "2" if self.retries else "1", r)
            self.assertRegex(r["when"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", r)
            self.assertIn("exit code 3", r["detail"], r)
            self.assertLessEqual(len(r["detail"]), 80, r)
        self.assertEqual([r["when"] for r in rows], sorted(r["when"] for r in rows), "not oldest first")
        self.assertIn("total: 3", total)

        # Non-destructive, also when named by the DLQ itself, and --count.
        p = await self.dlq_cmd("list", "--queue", self.dlq, "--count", "2")
        self.assertEqual(p.returncode, 0, p.stderr)
        rows, total = self.parse_list(p.stdout)
        self.assertEqual([r["id"] for r in rows], ids[:2])
        self.assertIn("total: 3", total)
        self.assertIn("2 listed", total)
        self.assertEqual(await self.listed_ids(), ids)
        await self.wait_queue_counts(self.dlq, ready=3, unacked=0)

        # The handler works now; replay only the second event.
        open(self.flag, "w").close()
        tap = await self.tap()
        daemon = await self.start_daemon(self.cfg_path)
        p = await self.dlq_cmd("replay", "--queue", self.queue, "--event-id", ids[1])
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("replayed event %s" % ids[1], p.stdout)
        self.assertIn("replayed 1 event(s)", p.stdout)
        recs = await self.wait_records(self.rec, 1)
        self.assertEqual(recs[0]["env"]["EVENT_ID"], ids[1])
        await daemon.wait_for_record("handled", event_id=ids[1], outcome="ack")
        self.assertEqual(await self.listed_ids(), [ids[0], ids[2]])  # the others stay, in order

        # --count 1 takes the oldest, then the rest.
        p = await self.dlq_cmd("replay", "--queue", self.queue, "--count", "1")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("replayed event %s" % ids[0], p.stdout)
        self.assertEqual(await self.listed_ids(), [ids[2]])
        # Handled before the next replay: two handlers running at once may
        # start (and record) in either order on a loaded machine.
        await self.wait_records(self.rec, 2)
        p = await self.dlq_cmd("replay", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("replayed event %s" % ids[2], p.stdout)

        recs = await self.wait_records(self.rec, 3)
        self.assertEqual([r["env"]["EVENT_ID"] for r in recs], [ids[1], ids[0], ids[2]])
        for r in recs:
            self.assertEqual(r["env"]["ATTEMPT"], "1", r["env"])
        await daemon.wait_for_record("handled", count=3, outcome="ack")
        await self.wait_queue_counts(self.queue, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0)
        p = await self.dlq_cmd("list", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("is empty", p.stdout)

        # What went over the wire: body and properties kept, failure headers gone.
        got = await self.get_all(tap, expect=3)
        self.assertEqual([m.message_id for m in got], [ids[1], ids[0], ids[2]])
        by_id = {e["event_id"]: e for e in events}
        for m in got:
            self.assertEqual(m.json(), by_id[m.message_id])
            self.assertEqual(m.routing_key, "dlqt.created")
            self.assertEqual(m.correlation_id, by_id[m.message_id]["correlation_id"])
            self.assertEqual(m.content_type, "application/json")
            self.assertEqual(m.headers.get("app-header"), "keep-me", m.headers)
            self.assertEqual([k for k in m.headers if is_failure_header(k)], [], m.headers)
        self.assertEqual(await daemon.stop(), 0)

    async def test_replay_to_missing_exchange_fails_and_leaves_dlq_unchanged(self):
        events, ids = await self.dead_letter_three()
        ch = await self.conn.channel()
        await ch.exchange_delete(self.exchange)
        await ch.close()

        p = await self.dlq_cmd("replay", "--queue", self.queue)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("exchange '%s' does not exist" % self.exchange, p.stderr)
        self.assertIn("replayed 0 event(s)", p.stdout)
        self.assertEqual(await self.listed_ids(), ids)

        # An id that is not there: exit 1, nothing moves.
        p = await self.dlq_cmd("replay", "--queue", self.queue, "--event-id", str(uuid.uuid4()))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("no event with id", p.stderr)
        await self.wait_queue_counts(self.dlq, ready=3, unacked=0)
        rows, _ = self.parse_list((await self.dlq_cmd("list", "--queue", self.queue)).stdout)
        self.assertEqual([r["id"] for r in rows], ids)
        self.assertTrue(all(r["reason"] in ("handler_failed", "max_attempts") for r in rows), rows)  # headers intact

    async def test_replay_failing_after_publish_leaves_the_dlq_unchanged(self):
        # The exchange exists (the passive check passes) but refuses publishes
        # (internal): the broker closes the channel after our publish, before
        # any confirm. Exit 1, a clear error, and the event it had taken is
        # back in the DLQ (never acked), in place.
        events, ids = await self.dead_letter_three()
        ch = await self.conn.channel()
        await ch.exchange_delete(self.exchange)
        await ch.close()
        await asyncio.to_thread(ensure_node_modules)  # pamqp refuses internal=True; amqplib does not
        js = ("const amqp = require('amqplib');"
              "(async () => { const c = await amqp.connect(process.argv[1]); const ch = await c.createChannel();"
              " await ch.assertExchange(process.argv[2], 'topic', {durable: true, internal: true});"
              " await c.close(); })().catch(e => { console.error(e); process.exit(1); });")
        p = await asyncio.to_thread(subprocess.run, ["node", "-e", js, AMQP_URL, self.exchange], cwd=HERE,
                                    capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)

        p = await self.dlq_cmd("replay", "--queue", self.queue)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("replay stopped", p.stderr)
        self.assertIn("internal exchange", p.stderr)
        self.assertIn("replayed 0 event(s)", p.stdout)
        await self.wait_queue_counts(self.dlq, ready=3, unacked=0)
        self.assertEqual(await self.listed_ids(), ids)

    async def test_unroutable_replay_stays_in_the_dlq_and_exits_non_zero(self):
        # Before: published without `mandatory`, acked in the same
        # transaction; an event no queue is bound for was dropped, exit 0.
        await self.declare_topology()
        lost = await self.put_in_dlq({"x-original-exchange": self.exchange,
                                      "x-original-routing-key": "nobody.listens", "x-original-queue": self.queue})
        ok = await self.put_in_dlq({"x-original-exchange": self.exchange, "x-original-routing-key": "dlqt.created",
                                    "x-original-queue": self.queue})
        for attempt in (1, 2):  # a second run neither loses it nor replays it
            p = await self.dlq_cmd("replay", "--queue", self.queue)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn("not replayed: event %s (dlqt.created): not routed: no queue is bound for routing key "
                          "'nobody.listens' on exchange '%s'; left in the dead-letter queue" % (lost, self.exchange),
                          p.stderr)
            self.assertIn("1 event(s) not replayed", p.stderr)
            self.assertIn("replayed %d event(s) from '%s', 1 not replayed" % (2 - attempt, self.dlq), p.stdout)
            await self.wait_queue_counts(self.dlq, ready=1, unacked=0)
            rows, _ = self.parse_list((await self.dlq_cmd("list", "--queue", self.queue)).stdout)
            self.assertEqual([(r["id"], r["reason"]) for r in rows], [(lost, "handler_failed")])  # headers intact
        got = await self.get_all(self.queue, expect=1)
        self.assertEqual([m.message_id for m in got], [ok])

    async def test_forged_original_exchange_header_is_ignored(self):
        # x-original-exchange is data from the message, not a destination:
        # another exchange, or "" (which reaches any queue by name), is never
        # published to; the config's exchange is, with x-original-routing-key.
        await self.declare_topology()
        other, trap = await self.other_exchange("trap")
        tap = await self.tap("#")
        to_other = await self.put_in_dlq({"x-original-exchange": other, "x-original-routing-key": "dlqt.created"})
        to_default = await self.put_in_dlq({"x-original-exchange": "", "x-original-routing-key": trap})
        p = await self.dlq_cmd("replay", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("replayed event %s (dlqt.created) to exchange '%s' with routing key 'dlqt.created'"
                      % (to_other, self.exchange), p.stdout)
        self.assertIn("replayed event %s (dlqt.created) to exchange '%s' with routing key '%s'"
                      % (to_default, self.exchange, trap), p.stdout)
        got = await self.get_all(tap, expect=2)
        self.assertEqual([(m.message_id, m.exchange, m.routing_key) for m in got],
                         [(to_other, self.exchange, "dlqt.created"), (to_default, self.exchange, trap)])
        self.assertEqual(await self.message_count(trap), 0)
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_to_queue_delivers_only_into_the_original_queue(self):
        await self.declare_topology()
        tap = await self.tap("dlqt.#")  # a second queue bound to the same keys as the work queue
        ids = [await self.put_in_dlq({"x-original-exchange": self.exchange, "x-original-routing-key": "dlqt.created",
                                      "x-original-queue": self.queue}) for _ in range(2)]
        p = await self.dlq_cmd("replay", "--queue", self.queue, "--to-queue")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        for i in ids:
            self.assertIn("replayed event %s (dlqt.created) into queue '%s'" % (i, self.queue), p.stdout)
        self.assertIn("replayed 2 event(s)", p.stdout)
        got = await self.get_all(self.queue, expect=2)
        self.assertEqual([m.message_id for m in got], ids)
        for m in got:
            self.assertEqual(m.headers.get("x-app-header"), "keep-me", m.headers)
            self.assertEqual([k for k in m.headers if is_failure_header(k)], [], m.headers)
        self.assertEqual(await self.message_count(tap), 0)
        self.assertEqual(await self.message_count(self.dlq), 0)

        # The control: without --to-queue the tap gets it too.
        again = await self.put_in_dlq({"x-original-routing-key": "dlqt.created", "x-original-queue": self.queue})
        p = await self.dlq_cmd("replay", "--queue", self.queue)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual([m.message_id for m in await self.get_all(tap, expect=1)], [again])
        self.assertEqual([m.message_id for m in await self.get_all(self.queue, expect=1)], [again])

    async def test_to_queue_refuses_a_queue_not_in_the_config(self):
        await self.declare_topology()
        tap = await self.tap("dlqt.#")  # exists on the broker, but is not a queue of the config
        foreign = await self.put_in_dlq({"x-original-routing-key": "dlqt.created", "x-original-queue": tap})
        unknown = await self.put_in_dlq({"x-original-routing-key": "dlqt.created"})
        good = await self.put_in_dlq({"x-original-routing-key": "dlqt.created", "x-original-queue": self.queue})
        p = await self.dlq_cmd("replay", "--queue", self.queue, "--to-queue")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("not replayed: event %s (dlqt.created): x-original-queue '%s' is not a queue of %s; left in "
                      "the dead-letter queue" % (foreign, tap, self.cfg_path), p.stderr)
        self.assertIn("not replayed: event %s (dlqt.created): no x-original-queue header" % unknown, p.stderr)
        self.assertIn("2 event(s) not replayed", p.stderr)
        self.assertIn("replayed event %s (dlqt.created) into queue '%s'" % (good, self.queue), p.stdout)
        self.assertEqual(await self.message_count(tap), 0)
        self.assertEqual([m.message_id for m in await self.get_all(self.queue, expect=1)], [good])
        await self.wait_queue_counts(self.dlq, ready=2, unacked=0)
        self.assertEqual(await self.listed_ids(), [foreign, unknown])

    async def test_unknown_queue_missing_dlq_and_usage(self):
        p = await self.dlq_cmd("list", "--queue", "no-such-queue")
        self.assertEqual(p.returncode, 1)
        self.assertIn("queue 'no-such-queue' is not in %s" % self.cfg_path, p.stderr)
        self.assertIn(self.queue, p.stderr)

        # Configured, but the daemon never ran: the DLQ is not declared yet.
        for cmd in ("list", "replay"):
            p = await self.dlq_cmd(cmd, "--queue", self.queue)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn("dead-letter queue '%s'" % self.dlq, p.stderr)
            self.assertIn("does not exist", p.stderr)
        self.assertIsNone(await self.message_count(self.dlq))

        # The default config path comes from $EVENT_ROUTER_CONFIG.
        p = await self.dlq_cmd("list", "--queue", "no-such-queue", config=False,
                               env={"EVENT_ROUTER_CONFIG": self.cfg_path})
        self.assertIn("is not in %s" % self.cfg_path, p.stderr)

        p = await self.dlq_cmd("--help", config=False)
        self.assertEqual(p.returncode, 0)
        self.assertIn("dlq replay", p.stdout)
        for bad in (["list"], ["frobnicate", "--queue", "q"], ["list", "--queue", "q", "--event-id", "x"],
                    ["replay", "--queue", "q", "--count", "0"], ["list", "--queue", "q", "--bogus"],
                    ["list", "--queue", "q", "--to-queue"], ["replay", "--queue", "q", "--to-queue=x"]):
            p = await self.dlq_cmd(*bad, config=False)
            self.assertEqual(p.returncode, 2, (bad, p.stderr))
            self.assertIn("usage:", p.stderr)
        p = await asyncio.to_thread(subprocess.run, [BINARY, "--help"], capture_output=True, text=True, timeout=30)
        self.assertIn("dlq", p.stdout)


if __name__ == "__main__":
    import unittest
    unittest.main()
