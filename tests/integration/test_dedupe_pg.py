"""The shared dedupe store (`dedupe_store: {postgres: ...}`,
docs/reliability.md#shared-dedupe-store-postgresql) against a real
PostgreSQL 15 that this module starts itself (pg_node.PgNode: initdb and
pg_ctl as the postgres user, a free port, a temp dir; one server per class).

- an event id that succeeded on one instance is acked as a duplicate on
  another, without running the handler; two copies arriving at once on two
  instances run once (the claim: the second is handed back, then is a
  duplicate);
- the ttl expires (the id runs again) and pruning deletes the expired row;
- PostgreSQL stopped mid-flow: /readyz says so, events are handed back, not
  lost, and each runs once when it is back; unreachable at start: the same;
- a query held up by a lock hits the time bound: handed back, then handled;
- a SIGKILLed instance's claim keeps the redelivery off other instances
  until its lease passes, then it runs.
"""
import asyncio
import os
import time
import unittest

from broker_node import free_port, http_get
from harness import RouterTestCase
import pg_node

TABLE = "event_router_dedupe"


@unittest.skipUnless(pg_node.available(), "PostgreSQL 15 server binaries not installed (scripts/install-deps.sh)")
class SharedDedupeTest(RouterTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.pg = pg_node.PgNode.for_class(cls)

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        if not self.pg.running():
            self.pg.start()  # a failed test may have left it stopped

    def pg_config(self, queue: str, record: str, ttl: str = "1h", sleep: float = 0, **store) -> str:
        handler = self.recorder("rec", record=record, args=(["--sleep", str(sleep)] if sleep else []))
        cfg = self.config([{"name": queue, "bindings": ["#"], "prefetch": 10, "dedupe": {"ttl": ttl},
                            "handlers": [handler]}])
        cfg["dedupe_store"] = dict({"postgres": "${ER_TEST_PG_URL}", "timeout": "1s"}, **store)
        self.http_port = free_port()
        cfg["http"] = {"listen": "127.0.0.1:%d" % self.http_port}
        return self.write_config(cfg, "router-%d.yaml" % self.http_port)

    async def start(self, path: str, **kw):
        return await self.start_daemon(path, env={"ER_TEST_PG_URL": self.pg.url}, **kw)

    async def readyz(self):
        st, _, body = await asyncio.to_thread(http_get, "http://127.0.0.1:%d/readyz" % self.http_port)
        return st, body

    async def wait_readyz(self, status: int, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                st, body = await self.readyz()
                if st == status:
                    return body
            except OSError:
                st, body = None, ""
            if time.monotonic() > deadline:
                self.fail("/readyz: wanted %d, last %s %r%s" % (status, st, body, self._daemon_tail()))
            await asyncio.sleep(0.1)

    def runs(self, record: str, event_id: str) -> int:
        return sum(1 for r in self.read_records(record) if ('"%s"' % event_id) in r["body"])

    async def test_duplicate_suppressed_across_two_instances(self):
        q = self.queue_name("work")
        record = self.record_file()
        path = self.pg_config(q, record)
        a = await self.start(path)
        ev = self.make_event("order.created")
        await self.publish(ev)
        await self.wait_records(record, 1)
        await a.stop()
        # Another instance (own process, own owner id) gets the same id: a duplicate.
        b = await self.start(path)
        await self.publish(ev)
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=15)
        self.assertEqual(self.runs(record, ev["event_id"]), 1)
        self.assertEqual(self.pg.sql("SELECT done FROM %s WHERE queue = '%s' AND event_id = '%s'"
                                     % (TABLE, q, ev["event_id"])), "t")

    async def test_two_copies_at_once_on_two_instances_run_once(self):
        q = self.queue_name("race")
        record = self.record_file()
        a = await self.start(self.pg_config(q, record, sleep=1.0))
        b = await self.start(self.pg_config(q, record, sleep=1.0))
        ev = self.make_event("order.created")
        await self.publish(ev)
        await self.publish(ev)
        await self.wait_records(record, 1)
        handed = None
        deadline = time.monotonic() + 10
        while handed is None and time.monotonic() < deadline:
            handed = next((d for d in (a, b) if d.records(
                "event in flight on another instance (dedupe claim); handing it back")), None)
            await asyncio.sleep(0.1)
        self.assertIsNotNone(handed, "the second copy did not meet the first one's claim:\n%s\n%s"
                             % (a.tail(20), b.tail(20)))
        # Handed back after 5 s, it is then a duplicate of the finished run.
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        self.assertEqual(self.runs(record, ev["event_id"]), 1)

    async def test_killed_instance_claim_holds_until_the_lease(self):
        # A SIGKILLed instance leaves its claim: the redelivery waits on the
        # other instance (handed back) until the lease passes, then runs; not lost.
        q = self.queue_name("lease")
        record = self.record_file()
        a = await self.start(self.pg_config(q, record, sleep=10, lease="4s"))
        ev = self.make_event("order.created")
        await self.publish(ev)
        await self.wait_records(record, 1)
        a.kill()
        t_kill = time.monotonic()
        b = await self.start(self.pg_config(q, record, lease="4s"))
        await b.wait_for_log(r"event in flight on another instance", timeout=10)
        recs = await self.wait_records(record, 2, timeout=30)
        self.assertGreater(time.monotonic() - t_kill, 3.0, "ran before the killed instance's lease passed")
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        self.assertEqual(self.runs(record, ev["event_id"]), 2)  # the killed run and the one after the lease
        self.assertEqual(len(recs), 2)

    async def test_ttl_expires_and_pruning_deletes_the_row(self):
        q = self.queue_name("ttl")
        record = self.record_file()
        d = await self.start(self.pg_config(q, record, ttl="2s"))
        ev = self.make_event("order.created")
        await self.publish(ev)
        await self.wait_records(record, 1)
        await self.publish(ev)  # within the ttl: a duplicate
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=10)
        self.assertEqual(self.runs(record, ev["event_id"]), 1)
        await asyncio.sleep(2.5)
        await self.publish(ev)  # expired: it runs again
        await self.wait_records(record, 2)
        # Expired rows are pruned (every ~10 s): the one of this queue goes.
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=10)
        self.pg.sql("UPDATE %s SET expires_at = now() - interval '1 s' WHERE queue = '%s'" % (TABLE, q))
        deadline = time.monotonic() + 15
        while self.pg.sql("SELECT count(*) FROM %s WHERE queue = '%s'" % (TABLE, q)) != "0":
            if time.monotonic() > deadline:
                self.fail("expired row not pruned" + self._daemon_tail())
            await asyncio.sleep(0.5)

    async def test_postgres_stopped_mid_flow_loses_nothing(self):
        q = self.queue_name("down")
        record = self.record_file()
        d = await self.start(self.pg_config(q, record))
        await self.wait_readyz(200)
        first = [self.make_event("order.created") for _ in range(5)]
        for ev in first:
            await self.publish(ev)
        await self.wait_records(record, 5)
        self.pg.stop()
        body = await self.wait_readyz(503)
        self.assertIn("dedupe store (PostgreSQL) unavailable", body)
        later = [self.make_event("order.created") for _ in range(5)]
        for ev in later:
            await self.publish(ev)
        await d.wait_for_log(r"dedupe store unavailable; handing the event back", timeout=10)
        await asyncio.sleep(1)
        self.assertEqual(len(self.read_records(record)), 5, "handled without the store")
        self.pg.start()
        await self.wait_readyz(200, timeout=40)
        await self.wait_records(record, 10, timeout=40)
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        for ev in first + later:
            self.assertEqual(self.runs(record, ev["event_id"]), 1, ev["event_id"])
        # The ones handled after the outage are recorded: their duplicates are skipped.
        await self.publish(later[0])
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        self.assertEqual(self.runs(record, later[0]["event_id"]), 1)

    async def test_postgres_unreachable_at_start(self):
        q = self.queue_name("nostart")
        record = self.record_file()
        self.pg.stop()
        d = await self.start(self.pg_config(q, record))
        body = await self.wait_readyz(503)
        self.assertIn("dedupe store (PostgreSQL) unavailable", body)
        ev = self.make_event("order.created")
        await self.publish(ev)
        await d.wait_for_log(r"dedupe store unavailable; handing the event back", timeout=10)
        self.assertEqual(self.read_records(record), [])
        self.pg.start()
        await self.wait_readyz(200, timeout=40)
        await self.wait_records(record, 1, timeout=30)
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        self.assertEqual(self.runs(record, ev["event_id"]), 1)

    async def test_on_unavailable_run_handles_without_dedupe(self):
        q = self.queue_name("run")
        record = self.record_file()
        self.pg.stop()
        d = await self.start(self.pg_config(q, record, on_unavailable="run"))
        await self.wait_readyz(200)  # it handles events: ready, the log says the rest
        ev = self.make_event("order.created")
        await self.publish(ev)
        await self.wait_records(record, 1, timeout=10)
        await d.wait_for_log(r"handling the event without dedupe", timeout=5)

    async def test_locked_table_hits_the_time_bound(self):
        q = self.queue_name("lock")
        record = self.record_file()
        d = await self.start(self.pg_config(q, record, timeout="300ms"))
        await self.wait_readyz(200)
        lock = self.pg.session("BEGIN; LOCK TABLE %s IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT;\n" % TABLE)
        try:
            await asyncio.sleep(0.5)
            ev = self.make_event("order.created")
            t0 = time.monotonic()
            await self.publish(ev)
            await d.wait_for_log(r"dedupe store unavailable; handing the event back", timeout=10)
            self.assertLess(time.monotonic() - t0, 2.5, "the claim waited for the lock")
            self.assertEqual(self.read_records(record), [])
        finally:
            await asyncio.to_thread(lock.communicate, None, 30)
        await self.wait_records(record, 1, timeout=30)
        await self.wait_queue_counts(q, ready=0, unacked=0, timeout=20)
        self.assertEqual(self.runs(record, ev["event_id"]), 1)


if __name__ == "__main__":
    unittest.main()
