"""`event-router plan`: the config against a live broker, through the
management HTTP API of a node of our own (BrokerNode(management=True)), with
a user tagged `management` and one that has no tag.

What each test shows: in sync right after the daemon declared the topology
(exit 0); a missing queue and binding (+), which the daemon then declares;
a stale binding (-), with a foreign queue on the same exchange left out; an
argument difference and a classic queue the config wants as quorum (~, old
→ new); an unreachable API, one that never answers, bad credentials, a user
without the management tag and a vhost that does not exist (exit 1, a clear
message, no password); and docs/scaling.md's "Migrating a queue to quorum"
(new name, reload, drain, delete if empty) under a running daemon, with
every event handled.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import unittest

import aio_pika

from broker_node import BrokerNode, free_port, publish_events
from harness import BINARY, RouterTestCase, sanitizer_report

PLAN_USER, PLAN_PASSWORD = "er-plan", "plan-pw-5b1e"


def run_plan(config_path, *args, env=None, timeout=120):
    e = dict(os.environ)
    e.pop("EVENT_ROUTER_MANAGEMENT_URL", None)
    e.pop("EVENT_ROUTER_CONFIG", None)
    if env:
        e.update(env)
    p = subprocess.run([BINARY, "plan", "--config", config_path, *args], capture_output=True, text=True, env=e,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    report = sanitizer_report(p.stderr)
    if report:
        raise AssertionError("sanitizer report from event-router plan:\n" + report)
    return p


class PlanTest(RouterTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.node = BrokerNode.for_class(cls, start=False, management=True)
        cls.node.start(timeout=240)  # the management plugin makes the boot slower
        cls.node.add_user(PLAN_USER, PLAN_PASSWORD, ("management",))
        cls.node.add_user("er-amqp-only", "amqp-pw", ())

    def node_config(self, queues, **top):
        cfg = self.config(queues, **top)
        cfg["broker"] = {"url": self.node.url, "rpc_timeout": "5s"}
        return cfg

    def queue(self, short, bindings, **extra):
        q = {"name": self.queue_name(short), "bindings": list(bindings), "retry": {"max_attempts": 2, "delay": "1s"},
             "handlers": [{"name": "h-" + short, "events": ["#"], "exec": ["/bin/true"]}]}
        q.update(extra)
        return q

    def mgmt(self, user=PLAN_USER, password=PLAN_PASSWORD):
        return self.node.management_url(user, password)

    async def declare_with_daemon(self, cfg_path):
        d = await self.start_daemon(cfg_path, ready_timeout=60)
        self.assertEqual(await d.stop(), 0, d.tail())

    def plan(self, cfg_path, *args, **kw):
        p = run_plan(cfg_path, *args, **kw)
        self.assertNotIn(PLAN_PASSWORD, p.stdout + p.stderr)
        self.assertNotIn(":guest@", p.stdout + p.stderr)
        return p

    def assertLines(self, out, *lines):
        have = out.splitlines()
        for line in lines:
            self.assertIn(line, have, out)

    async def test_in_sync_after_the_daemon_declared(self):
        q = self.queue("work", ["a.*", "b.#"])
        path = self.write_config(self.node_config([q]))
        await self.declare_with_daemon(path)
        # Credentials from the URL, a user tagged `management` only.
        p = self.plan(path, "--management", self.mgmt())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("In sync: the exchange, 3 queues and 2 bindings match the config.", p.stdout)
        self.assertIn("vhost '/'", p.stdout)
        # No user in the URL: the broker URL's (guest), from the environment.
        p = self.plan(path, env={"EVENT_ROUTER_MANAGEMENT_URL": self.node.management_url()})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    async def test_missing_queue_and_binding(self):
        q = self.queue("work", ["a.*"])
        await self.declare_with_daemon(self.write_config(self.node_config([q]), "v1.yaml"))
        q2 = self.queue("more", ["c.*"])
        q["bindings"] = ["a.*", "n.*"]
        path = self.write_config(self.node_config([q, q2]), "v2.yaml")
        p = self.plan(path, "--management", self.mgmt())
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        ex, w, m = self.exchange, q["name"], q2["name"]
        self.assertLines(p.stdout,
                         "+ binding '%s' → '%s' key 'n.*'" % (ex, w),
                         "+ queue '%s' (classic)" % m,
                         "+ dead-letter queue '%s.dlq' (classic)" % m,
                         "+ retry delay queue '%s.retry.1000' (classic, x-dead-letter-exchange=\"\", "
                         "x-dead-letter-routing-key=\"%s\")" % (m, m),
                         "+ binding '%s' → '%s' key 'c.*'" % (ex, m))
        self.assertIn("Not in sync: 5 to add, 0 to change, 0 stale.", p.stdout)
        self.assertNotIn("\n~", p.stdout)
        self.assertNotIn("\n-", p.stdout)
        # What plan called missing is what the daemon declares.
        await self.declare_with_daemon(path)
        p = self.plan(path, "--management", self.mgmt())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    async def test_stale_binding(self):
        q = self.queue("work", ["a.*", "old.#"])
        await self.declare_with_daemon(self.write_config(self.node_config([q]), "v1.yaml"))
        conn = await aio_pika.connect(self.node.url)
        try:
            ch = await conn.channel()
            # A queue the config does not own, on the same exchange: not stale.
            other = await ch.declare_queue(self.prefix + ".foreign", durable=True)
            await other.bind(self.exchange, "old.#")
            q["bindings"] = ["a.*"]
            path = self.write_config(self.node_config([q]), "v2.yaml")
            p = self.plan(path, "--management", self.mgmt())
            self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
            self.assertLines(p.stdout, "- binding '%s' → '%s' key 'old.#'" % (self.exchange, q["name"]))
            self.assertIn("Not in sync: 0 to add, 0 to change, 1 stale.", p.stdout)
            self.assertNotIn(".foreign", p.stdout)
            # Unbound by hand: in sync again.
            work = await ch.get_queue(q["name"], ensure=False)
            await work.unbind(self.exchange, "old.#")
            p = self.plan(path, "--management", self.mgmt())
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        finally:
            await conn.close()

    async def test_argument_and_queue_type_differences(self):
        typed = self.queue("typed", ["t.*"], arguments={"x-queue-type": "quorum"})
        limited = self.queue("limited", ["l.*"], arguments={"x-max-length": 20})
        cfg = self.node_config([typed, limited])
        conn = await aio_pika.connect(self.node.url)
        try:
            ch = await conn.channel()
            # By hand, as an older config had them: classic, and a lower limit.
            await ch.declare_queue(typed["name"], durable=True)
            await ch.declare_queue(limited["name"], durable=True, arguments={"x-max-length": 10})
        finally:
            await conn.close()
        path = self.write_config(cfg)
        p = self.plan(path, "--management", self.mgmt())
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        out = p.stdout
        self.assertIn("~ queue '%s'\n~     type: classic → quorum\n" % typed["name"], out)
        self.assertIn("~ queue '%s'\n~     x-max-length: 10 → 20\n" % limited["name"], out)
        self.assertIn("Migrating a queue to quorum", out)
        self.assertIn("2 to change", out)
        # The daemon refuses exactly this: the plan's ~ is what stops a start.
        d = await self.start_daemon(path, wait_ready=False)
        code = await d.wait_exit(60)
        self.assertNotEqual(code, 0, d.tail())
        self.assertRegex(d.log(), r"x-queue-type|x-max-length")

    async def test_unreachable_or_silent_api(self):
        path = self.write_config(self.node_config([self.queue("work", ["a.*"])], ))
        port = free_port()
        p = self.plan(path, "--management", "http://127.0.0.1:%d/" % port)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("cannot reach the management API at http://127.0.0.1:%d/" % port, p.stderr)
        self.assertIn("refused", p.stderr.lower())
        # Accepts the connection, never answers: bounded by broker.rpc_timeout (5s here).
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        try:
            t0 = time.monotonic()
            p = self.plan(path, "--management", "http://127.0.0.1:%d/" % silent.getsockname()[1])
            took = time.monotonic() - t0
        finally:
            silent.close()
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("did not answer within 5s", p.stderr)
        self.assertLess(took, 60)  # the contract bounds it; generous for a loaded machine
        # A usage error is 1 too: 2 means "differs".
        p = self.plan(path, "--bogus")
        self.assertEqual(p.returncode, 1, p.stderr)
        p = self.plan(path, "--management", "https://127.0.0.1:15671/")
        self.assertEqual(p.returncode, 1)
        self.assertIn("https:// is not supported", p.stderr)

    async def test_credentials_and_vhost(self):
        path = self.write_config(self.node_config([self.queue("work", ["a.*"])]))
        p = self.plan(path, "--management", self.mgmt(PLAN_USER, "wrong-pw-77"))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("refused user '%s' (401: Login failed)" % PLAN_USER, p.stderr)
        self.assertNotIn("wrong-pw-77", p.stderr)
        p = self.plan(path, "--management", self.mgmt("er-amqp-only", "amqp-pw"))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("refused user 'er-amqp-only' (401: Not management user)", p.stderr)
        self.assertIn("management, monitoring or administrator tag", p.stderr)
        cfg = self.node_config([self.queue("work", ["a.*"])])
        cfg["broker"]["url"] = self.node.url + "no-such-vhost"
        p = self.plan(self.write_config(cfg, "vhost.yaml"), "--management", self.node.management_url())
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("vhost 'no-such-vhost'", p.stderr)

    async def test_migrating_a_queue_to_quorum_by_new_name(self):
        """docs/scaling.md, steps 2 to 8, with the daemon running."""
        def body_id(r):
            b = r["body"]
            return (json.loads(b) if isinstance(b, str) else b)["event_id"]

        old_rec, new_rec = self.record_file("old"), self.record_file("new")
        old = {"name": self.queue_name("orders"), "bindings": ["m.*"], "retry": {"max_attempts": 2, "delay": "1s"},
               "handlers": [self.recorder("h-old", record=old_rec)]}
        v1 = self.write_config(self.node_config([old]), "v1.yaml")
        d = await self.start_daemon(v1, ready_timeout=60)
        before = [self.make_event("m.created", {"n": i}) for i in range(20)]
        await publish_events(self.node.url, self.exchange, before)
        await self.wait_records(old_rec, 20)

        # Steps 2-3: the new quorum queue beside the old one, which loses its bindings.
        new = {"name": self.queue_name("orders-q"), "bindings": ["m.*"], "retry": {"max_attempts": 2, "delay": "1s"},
               "arguments": {"x-queue-type": "quorum"}, "dead_letter_arguments": {"x-queue-type": "quorum"},
               "handlers": [self.recorder("h-new", record=new_rec)]}
        v2_old = dict(old, bindings=[])
        v2 = self.write_config(self.node_config([v2_old, new]), "v2.yaml")
        p = self.plan(v2, "--management", self.mgmt())
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
        self.assertLines(p.stdout, "+ queue '%s' (quorum)" % new["name"],
                         "+ dead-letter queue '%s.dlq' (quorum)" % new["name"],
                         "+ binding '%s' → '%s' key 'm.*'" % (self.exchange, new["name"]),
                         "- binding '%s' → '%s' key 'm.*'" % (self.exchange, old["name"]))
        self.assertNotIn("\n~", p.stdout)

        # Step 4: reload; from then on events go to the new queue only.
        start = len(d.log())
        os.replace(v2, v1)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_log(r"(?m)^\S+ \S+ reloaded", start=start, timeout=60)
        after = [self.make_event("m.created", {"n": 100 + i}) for i in range(20)]
        await publish_events(self.node.url, self.exchange, after)
        await self.wait_records(new_rec, 20)
        p = self.plan(v1, "--management", self.mgmt())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

        # Every event handled; those published after the switch on the new queue.
        handled_old = [body_id(r) for r in self.read_records(old_rec)]
        handled_new = [body_id(r) for r in self.read_records(new_rec)]
        self.assertEqual(set(handled_old) | set(handled_new), {e["event_id"] for e in before + after})
        self.assertEqual(set(handled_new) & {e["event_id"] for e in before}, set())
        self.assertEqual(set(handled_new), {e["event_id"] for e in after})

        # Steps 5, 7, 8: the old queue is drained; out of the config; deleted if empty.
        v3 = self.write_config(self.node_config([new]), "v3.yaml")
        start = len(d.log())
        os.replace(v3, v1)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_log(r"(?m)^\S+ \S+ reloaded", start=start, timeout=60)
        conn = await aio_pika.connect(self.node.url)
        try:
            ch = await conn.channel()
            for q in (old["name"], old["name"] + ".dlq", old["name"] + ".retry.1000"):
                await ch.queue_delete(q, if_empty=True)
        finally:
            await conn.close()
        p = self.plan(v1, "--management", self.mgmt())
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
