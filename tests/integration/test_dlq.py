"""`event-router dlq list|replay`: inspect the dead-letter queue without
changing it, replay events (all, by id, or N) to their original exchange with
the failure headers removed, and leave the DLQ untouched when a replay fails."""
import asyncio
import os
import re
import stat
import subprocess
import sys
import textwrap
import uuid

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

    async def test_replay_failing_mid_transaction_rolls_back(self):
        # The exchange exists (the passive check passes) but refuses publishes
        # (internal): the broker closes the channel after our publish, so the
        # replay fails between publish and commit-ok. Exit 1, a clear error,
        # and the event it had taken is back in the DLQ, in place.
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

    async def test_broker_rolls_back_publish_and_ack_when_the_client_dies_before_commit(self):
        # The protocol replay relies on, against this broker: the same steps as
        # `dlq replay` (tx.select, get, publish, ack), then the process exits
        # without tx.commit. Neither the publish nor the ack may take effect.
        events, ids = await self.dead_letter_three()
        tap = await self.tap()
        script = textwrap.dedent("""\
            import asyncio, os, sys
            sys.path.append("/usr/lib/python3/dist-packages")
            import aiormq
            async def main(url, dlq, exchange):
                conn = await aiormq.connect(url)
                ch = await conn.channel(publisher_confirms=False)
                await ch.tx_select()
                got = await ch.basic_get(dlq, no_ack=False)
                await ch.basic_publish(got.body, exchange=exchange, routing_key="dlqt.created",
                                       properties=got.header.properties)
                await ch.basic_ack(got.delivery.delivery_tag)
                await ch.queue_declare(dlq, passive=True)  # round trip: the broker has both
                print("published and acked, not committed", flush=True)
                os._exit(0)  # no tx.commit, no connection.close
            asyncio.run(main(*sys.argv[1:]))
            """)
        p = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script, AMQP_URL, self.dlq, self.exchange],
                                    capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("not committed", p.stdout)
        await self.wait_queue_counts(self.dlq, ready=3, unacked=0)
        self.assertEqual(await self.listed_ids(), ids)
        self.assertEqual(await self.message_count(tap), 0)

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
                    ["replay", "--queue", "q", "--count", "0"], ["list", "--queue", "q", "--bogus"]):
            p = await self.dlq_cmd(*bad, config=False)
            self.assertEqual(p.returncode, 2, (bad, p.stderr))
            self.assertIn("usage:", p.stderr)
        p = await asyncio.to_thread(subprocess.run, [BINARY, "--help"], capture_output=True, text=True, timeout=30)
        self.assertIn("dlq", p.stdout)


if __name__ == "__main__":
    import unittest
    unittest.main()
