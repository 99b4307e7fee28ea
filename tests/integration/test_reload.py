"""Reload on SIGHUP: under a continuous stream of events nothing is lost or
handled twice; new handler config and new queues apply after "reloaded"; a
reload with a broken config (bad YAML, missing plugin) logs "reload failed;
keeping the running config" and the old config keeps running; a queue removed
from the config stops being consumed (it is not deleted: what is published to
it afterwards stays there) and is consumed again when it comes back.

The handler is handlers/record_tag.c, compiled into the test's temp dir: one
line "<event_id> <tag> <queue>" per handled event, the tag taken from the
handler's `config:`, so each line says which config's handler instance ran it.

Run:  cd tests/integration && /usr/bin/python3 -m unittest -v test_reload
"""
import asyncio
import os
import signal
import socket
import subprocess
import time
import unittest
import uuid
from collections import Counter
from typing import Dict, List, Optional, Tuple

from harness import HERE, SOURCE_DIR, RouterTestCase

PLUGIN_SOURCE = os.path.join(HERE, "handlers", "record_tag.c")
N_EVENTS = 3000


class ReloadTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.plugin = os.path.join(self.tmp, "librecord_tag.so")
        p = await asyncio.to_thread(subprocess.run, [
            os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
            "-I" + os.path.join(SOURCE_DIR, "include"), "-o", self.plugin, PLUGIN_SOURCE],
            capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError("compiling record_tag.c failed:\n" + p.stderr)
        self.qa = self.queue_name("a")
        self.qb = self.queue_name("b")
        self.rec_a = os.path.join(self.tmp, "a.rec")
        self.rec_b = os.path.join(self.tmp, "b.rec")
        self.config_path = os.path.join(self.tmp, "router.yaml")
        self.notify: Optional[socket.socket] = None

    # -- configs -------------------------------------------------------------------

    def handler(self, name: str, file: str, tag: str, sleep_us: int = 0, plugin: Optional[str] = None):
        return {"name": name, "events": ["#"], "plugin": plugin or self.plugin,
                "config": {"file": file, "tag": tag, "sleep_us": sleep_us}}

    def cfg1(self, sleep_us: int = 300) -> Dict:
        """Queue A only, handler tagged v1."""
        return self.config([{"name": self.qa, "bindings": ["a.#"], "prefetch": 40,
                             "handlers": [self.handler("rec-a", self.rec_a, "v1", sleep_us)]}],
                           workers=4)

    def cfg2(self, sleep_us: int = 300, b_sleep_us: int = 300, plugin: Optional[str] = None) -> Dict:
        """Queue A with its handler's config changed (tag v2, prefetch too), plus queue B."""
        return self.config([
            {"name": self.qa, "bindings": ["a.#"], "prefetch": 25,
             "handlers": [self.handler("rec-a", self.rec_a, "v2", sleep_us)]},
            {"name": self.qb, "bindings": ["b.#"], "prefetch": 10,
             "handlers": [self.handler("rec-b", self.rec_b, "b", b_sleep_us, plugin)]},
        ], workers=4)

    def install(self, cfg) -> None:
        """Replaces the config file atomically (the daemon never reads half a file)."""
        tmp = self.config_path + ".new"
        self.write_config(cfg, os.path.basename(tmp))
        os.replace(tmp, self.config_path)

    async def reload(self, d, cfg, expect_ok: bool = True, timeout: float = 30.0) -> None:
        """Installs `cfg` (dict or YAML text), sends SIGHUP and waits for the
        reload's outcome record."""
        msg = "reloaded" if expect_ok else "reload failed; keeping the running config"
        before = len(d.records(msg))
        self.install(cfg)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record(msg, timeout=timeout, count=before + 1)

    # -- records -------------------------------------------------------------------

    @staticmethod
    def read_rec(path: str) -> List[Tuple[str, str, str]]:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [tuple(line.split()) for line in f if line.strip()]

    async def wait_rec(self, path: str, ids, timeout: float = 60.0) -> List[Tuple[str, str, str]]:
        """Waits until every id in `ids` was recorded; returns all records."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            recs = self.read_rec(path)
            missing = want - {r[0] for r in recs}
            if not missing:
                return recs
            if time.monotonic() > deadline:
                self.fail("%s: %d of %d event(s) never handled, e.g. %s%s"
                          % (os.path.basename(path), len(missing), len(want), sorted(missing)[:3],
                             self._daemon_tail()))
            await asyncio.sleep(0.1)

    def assert_exactly_once(self, recs, ids, what: str) -> None:
        counts = Counter(r[0] for r in recs)
        dups = {i: c for i, c in counts.items() if c > 1}
        self.assertEqual(dups, {}, "%s: %d event(s) handled more than once" % (what, len(dups)))
        self.assertEqual(set(counts), set(ids), "%s: handled ids differ from published ids" % what)

    async def publish_ids(self, routing_key: str, ids: List[str], chunk: int = 50, pause: float = 0.0) -> None:
        for i in range(0, len(ids), chunk):
            await asyncio.gather(*(self.publish(self.make_event(routing_key, {"n": i + j}, event_id=eid))
                                   for j, eid in enumerate(ids[i:i + chunk])))
            if pause:
                await asyncio.sleep(pause)

    def bind_notify_socket(self) -> Dict[str, str]:
        """A NOTIFY_SOCKET like systemd's. It is read as messages arrive: the
        kernel queues only a few datagrams (net.unix.max_dgram_qlen) and the
        daemon's non-blocking sd_notify drops what does not fit."""
        path = os.path.join(self.tmp, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        self.notify.setblocking(False)
        self.notified: List[str] = []
        loop = asyncio.get_running_loop()

        def readable():
            while True:
                try:
                    self.notified.append(self.notify.recv(65536).decode())
                except BlockingIOError:
                    return

        loop.add_reader(self.notify.fileno(), readable)

        def close():
            loop.remove_reader(self.notify.fileno())
            self.notify.close()

        self.addCleanup(close)
        return {"NOTIFY_SOCKET": path}

    def notify_messages(self) -> List[str]:
        return list(self.notified)

    async def assert_drained(self, *queues: str) -> None:
        for q in queues:
            await self.wait_queue_counts(q, ready=0, unacked=0, timeout=30)
            self.assertEqual(await self.message_count(q + ".dlq"), 0, "dead letters in " + q + ".dlq")

    # -- tests ---------------------------------------------------------------------

    async def test_reload_under_load_nothing_lost_or_run_twice(self):
        self.install(self.cfg1())
        d = await self.start_daemon(self.config_path, env=self.bind_notify_socket())
        ids_a = ["a-%05d-%s" % (i, uuid.uuid4().hex[:8]) for i in range(N_EVENTS)]
        ids_b = ["b-%05d-%s" % (i, uuid.uuid4().hex[:8]) for i in range(600)]
        publishing_a = asyncio.create_task(self.publish_ids("a.thing", ids_a, chunk=50, pause=0.05))

        # Alternate the two configs while A's stream flows; B exists from the
        # first reload on, and is removed and added again every other reload.
        plan = [self.cfg2, self.cfg1, self.cfg2, self.cfg1, self.cfg2, self.cfg1, self.cfg2]
        publishing_b = None
        b_seen_before_reload = None
        for i, make in enumerate(plan):
            await asyncio.sleep(0.4)
            if i == 0:
                self.assertFalse(os.path.exists(self.rec_b))
                self.assertIsNone(await self.message_count(self.qb), "queue B exists before its reload")
            await self.reload(d, make())
            if i == 0:
                b_seen_before_reload = len(self.read_rec(self.rec_b))
                # Declared by the reload: publish B's stream now (it keeps
                # flowing while B is removed and added again).
                publishing_b = asyncio.create_task(self.publish_ids("b.thing", ids_b, chunk=20, pause=0.05))
        self.assertFalse(publishing_a.done(), "the stream ended before the reloads: make it longer")
        await publishing_a
        await publishing_b
        self.assertEqual(b_seen_before_reload, 0)

        recs_a = await self.wait_rec(self.rec_a, ids_a, timeout=90)
        recs_b = await self.wait_rec(self.rec_b, ids_b, timeout=90)
        await self.assert_drained(self.qa, self.qb)
        await asyncio.sleep(1.0)  # late duplicates would show up now
        recs_a, recs_b = self.read_rec(self.rec_a), self.read_rec(self.rec_b)
        self.assert_exactly_once(recs_a, ids_a, "queue A")
        self.assert_exactly_once(recs_b, ids_b, "queue B")
        self.assertTrue(d.running())

        # Both handler configs really ran, on the right queues.
        tags = Counter(r[1] for r in recs_a)
        self.assertGreater(tags["v1"], 0, tags)
        self.assertGreater(tags["v2"], 0, tags)
        self.assertEqual(set(tags), {"v1", "v2"})
        self.assertEqual({r[2] for r in recs_a}, {self.qa})
        self.assertEqual({(r[1], r[2]) for r in recs_b}, {("b", self.qb)})

        # Logged, and told to systemd: RELOADING=1 then READY=1 per reload.
        self.assertEqual(len(d.records("reloading")), len(plan))
        self.assertEqual(len(d.records("reloaded")), len(plan))
        self.assertEqual(d.records("reload failed; keeping the running config"), [])
        self.assertEqual(len(d.records("stopped consuming a queue removed from the config", queue=self.qb)), 3)
        msgs = self.notify_messages()
        states = [m.split("\n")[0] for m in msgs if m.startswith(("RELOADING=1", "READY=1"))]
        self.assertEqual(states[0], "READY=1", msgs[:5])
        self.assertEqual(states[1:], ["RELOADING=1", "READY=1"] * len(plan), states)

        # After the last reload (cfg2) only v2 runs on A.
        more = ["late-%03d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(50)]
        await self.publish_ids("a.thing", more)
        recs = await self.wait_rec(self.rec_a, more)
        self.assertEqual({r[1] for r in recs if r[0] in set(more)}, {"v2"})
        self.assertEqual(d.records("dead-lettering"), [])

    async def test_broken_reload_keeps_the_running_config(self):
        self.install(self.cfg1(sleep_us=0))
        d = await self.start_daemon(self.config_path)

        async def check_still_v1(n: int = 20) -> None:
            ids = [uuid.uuid4().hex for _ in range(n)]
            await self.publish_ids("a.thing", ids)
            recs = await self.wait_rec(self.rec_a, ids)
            self.assertEqual({r[1] for r in recs if r[0] in set(ids)}, {"v1"})

        await check_still_v1()
        # Bad YAML.
        await self.reload(d, "queues: [unclosed\n  - {name: x\n", expect_ok=False)
        failed = d.records("reload failed; keeping the running config")
        self.assertEqual(len(failed), 1)
        self.assertIn("router.yaml", failed[0].fields.get("error", ""), failed[0].line)
        await check_still_v1()
        # A valid config whose plugin is missing (the change would add queue B).
        missing = os.path.join(self.tmp, "no-such-plugin.so")
        await self.reload(d, self.cfg2(sleep_us=0, b_sleep_us=0, plugin=missing), expect_ok=False)
        failed = d.records("reload failed; keeping the running config")
        self.assertEqual(len(failed), 2)
        self.assertIn("no-such-plugin.so", failed[1].line)
        await check_still_v1()
        self.assertIsNone(await self.message_count(self.qb), "a failed reload declared queue B")
        self.assertEqual(len(d.records("reloaded")), 0)
        self.assertTrue(d.running())
        # A good reload after the broken ones applies.
        await self.reload(d, self.cfg2(sleep_us=0, b_sleep_us=0))
        ids = [uuid.uuid4().hex for _ in range(10)]
        await self.publish_ids("b.thing", ids)
        await self.wait_rec(self.rec_b, ids)
        await self.assert_drained(self.qa, self.qb)

    async def test_removed_queue_stops_being_consumed_and_is_kept(self):
        self.install(self.cfg2(sleep_us=0, b_sleep_us=0))
        d = await self.start_daemon(self.config_path)
        first = [uuid.uuid4().hex for _ in range(10)]
        await self.publish_ids("b.thing", first)
        await self.wait_rec(self.rec_b, first)

        await self.reload(d, self.cfg1(sleep_us=0))
        await d.wait_for_record("stopped consuming a queue removed from the config", queue=self.qb)
        later = [uuid.uuid4().hex for _ in range(10)]
        await self.publish_ids("b.thing", later)
        # A is still handled; B's new events stay in B (not consumed, not deleted).
        a_ids = [uuid.uuid4().hex for _ in range(5)]
        await self.publish_ids("a.thing", a_ids)
        await self.wait_rec(self.rec_a, a_ids)
        await asyncio.sleep(1.5)
        self.assertEqual(await self.message_count(self.qb), len(later))
        info = await self.queue_info(self.qb)
        self.assertIsNotNone(info, "the removed queue was deleted")
        self.assertEqual(info.get("consumers"), 0, info)
        self.assertEqual(info.get("messages_unacknowledged"), 0, info)
        handled_b = {r[0] for r in self.read_rec(self.rec_b)}
        self.assertEqual(handled_b & set(later), set(), "a removed queue was still consumed")

        # Back in the config: consumed again, each event once.
        await self.reload(d, self.cfg2(sleep_us=0, b_sleep_us=0))
        recs = await self.wait_rec(self.rec_b, first + later)
        self.assert_exactly_once(recs, first + later, "queue B")
        await self.assert_drained(self.qa, self.qb)

    async def test_queue_removed_while_busy_then_added_back(self):
        # B's handler is slow: events are in flight when B is removed, and B
        # comes back before they finish.
        self.install(self.cfg2(sleep_us=0, b_sleep_us=400_000))
        d = await self.start_daemon(self.config_path)
        first = [uuid.uuid4().hex for _ in range(8)]
        await self.publish_ids("b.thing", first)
        await asyncio.sleep(0.2)  # the first ones are running now
        await self.reload(d, self.cfg1(sleep_us=0))
        await self.reload(d, self.cfg2(sleep_us=0, b_sleep_us=0))
        later = [uuid.uuid4().hex for _ in range(10)]
        await self.publish_ids("b.thing", later)
        recs = await self.wait_rec(self.rec_b, first + later, timeout=30)
        await asyncio.sleep(1.0)
        self.assert_exactly_once(self.read_rec(self.rec_b), first + later, "queue B")
        info = await self.queue_info(self.qb)
        self.assertEqual(info.get("consumers"), 1, info)
        await self.assert_drained(self.qa, self.qb)

    async def test_reload_the_broker_refuses_keeps_running(self):
        # Queue B already exists with an argument the new config does not
        # declare: the broker refuses the reload's declare (PRECONDITION_FAILED
        # closes the declaring channel, which also carries the daemon's
        # dead-letter and retry copies).
        ch = await self.conn.channel()
        await ch.declare_queue(self.qb, durable=True, arguments={"x-max-length": 1000})
        await ch.close()
        self.install(self.cfg1(sleep_us=0))
        d = await self.start_daemon(self.config_path)
        await self.reload(d, self.cfg2(sleep_us=0, b_sleep_us=0), expect_ok=False)
        failed = d.records("reload failed; keeping the running config")
        self.assertIn("x-max-length", failed[0].line)
        self.assertTrue(d.running())
        # The old config still runs: A is handled with v1 ...
        ids = [uuid.uuid4().hex for _ in range(10)]
        await self.publish_ids("a.thing", ids)
        recs = await self.wait_rec(self.rec_a, ids)
        self.assertEqual({r[1] for r in recs}, {"v1"})
        # ... and bad input is still dead-lettered (a confirmed copy on the
        # daemon's publish channel).
        await self.publish_raw(b"{not json", "a.thing", message_id="bad-1")
        dead = await self.get_all(self.qa + ".dlq", expect=1, timeout=20)
        self.assertEqual([m.message_id for m in dead], ["bad-1"])
        await self.assert_drained(self.qa)
        # A config that matches the broker reloads fine afterwards.
        fixed = self.cfg2(sleep_us=0, b_sleep_us=0)
        fixed["queues"][1]["arguments"] = {"x-max-length": 1000}
        await self.reload(d, fixed)
        ids = [uuid.uuid4().hex for _ in range(5)]
        await self.publish_ids("b.thing", ids)
        await self.wait_rec(self.rec_b, ids)
        await self.assert_drained(self.qa, self.qb)


if __name__ == "__main__":
    unittest.main()
