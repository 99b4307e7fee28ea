"""A classic queue whose home node is down takes only itself out of service
(docs/scaling.md, "A node that is down"), on a real two-node cluster of our
own (cluster.Cluster, one per module; never the shared broker):

queue B lives on node B, queue A on node A, the daemon is connected to node A.
With node B stopped the daemon keeps handling queue A's events, retries queue
B with backoff (its log names the queue and the broker's `home node ... is down
or inaccessible`), /readyz answers 200 "ready; degraded: not consuming queue
'B' (...)", `event_router_queue_consumed` is 0 for B, a SIGHUP reload still
succeeds, and the daemon never exits; once node B is back, queue B is consumed
again and its events are handled. The figures (cluster start, time to resume)
are printed as CLUSTER-RESULT lines.
"""
import asyncio
import secrets
import sys
import time
import unittest

import aio_pika

from harness import RouterTestCase
from broker_node import free_port, http_get, publish_events
from cluster import Cluster


class NodeDownTest(RouterTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cluster = Cluster.for_class(cls, 2)
        sys.stderr.write("CLUSTER-RESULT cluster of 2 nodes started and joined in %.1fs\n" % cls.cluster.started_in)

    async def get(self, port, path):
        return await asyncio.to_thread(http_get, "http://127.0.0.1:%d%s" % (port, path))

    async def wait_handled(self, rec, ids, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            seen = {r["env"].get("EVENT_ID") or r.get("event_id") for r in self.read_records(rec)}
            bodies = " ".join(r.get("body", "") for r in self.read_records(rec))
            if all(i in seen or i in bodies for i in ids):
                return
            if time.monotonic() > deadline:
                self.fail("events not handled: %s%s" % ([i for i in ids if i not in bodies], self._daemon_tail()))
            await asyncio.sleep(0.1)

    async def publish_to(self, node, prefix, n):
        events = [self.make_event(prefix + ".x", event_id="%s-%02d-%s" % (prefix, i, secrets.token_hex(3)))
                  for i in range(n)]
        await publish_events(node.url, self.exchange, events)
        return [e["event_id"] for e in events]

    async def test_queue_on_a_stopped_node_is_retried_alone_and_comes_back(self):
        a, b = self.cluster.nodes
        qa, qb = self.queue_name("on-a"), self.queue_name("on-b")
        # Queue B's home is node B: declared there first; the daemon's declare
        # through node A leaves it where it is.
        conn = await aio_pika.connect(b.url)
        await (await conn.channel()).declare_queue(qb, durable=True)
        await conn.close()
        rec_a, rec_b = self.record_file("a"), self.record_file("b")
        cfg = self.config([
            {"name": qa, "bindings": ["ona.*"], "handlers": [self.recorder("ra", record=rec_a)]},
            {"name": qb, "bindings": ["onb.*"], "handlers": [self.recorder("rb", record=rec_b)]},
        ])
        cfg["broker"] = {"url": a.url, "heartbeat": "30s", "reconnect": {"initial": "300ms", "max": "1s"}}
        port = free_port()
        cfg["http"] = {"listen": "127.0.0.1:%d" % port}
        path = self.write_config(cfg)
        d = await self.start_daemon(path)
        on_b = {r["name"] for r in await asyncio.to_thread(b.ctl_json, "list_queues", "--local", "name")}
        self.assertIn(qb, on_b)
        self.assertNotIn(qa, on_b)
        await self.wait_handled(rec_a, await self.publish_to(a, "ona", 3))
        await self.wait_handled(rec_b, await self.publish_to(a, "onb", 3))
        self.assertEqual((await self.get(port, "/readyz"))[2], "ready\n")

        await asyncio.to_thread(b.stop)
        # Its consumer is cancelled, then every declare is refused: NOT_FOUND, home node down.
        deadline = time.monotonic() + 60
        while not any("home node" in r.fields.get("reason", "")
                      for r in d.records("queue channel lost, recovering", queue=qb)):
            if time.monotonic() > deadline:
                self.fail("no recovery record naming the home node" + self._daemon_tail())
            await asyncio.sleep(0.2)
        # Queue A goes on.
        await self.wait_handled(rec_a, await self.publish_to(a, "ona", 5))
        st, _, body = await self.get(port, "/readyz")
        self.assertEqual(st, 200, body)
        self.assertTrue(body.startswith("ready; degraded: not consuming queue '%s'" % qb), body)
        self.assertIn("down or inaccessible", body)
        self.assertNotIn(qa, body)
        _, _, metrics = await self.get(port, "/metrics")
        self.assertIn('event_router_queue_consumed{queue="%s"} 0' % qb, metrics)
        self.assertIn('event_router_queue_consumed{queue="%s"} 1' % qa, metrics)
        # A reload meanwhile succeeds: the missing queue is left to its consumer.
        reloads = len(d.records("reloaded"))
        d.send_signal(__import__("signal").SIGHUP)
        await d.wait_for_record("reloaded", count=reloads + 1, timeout=60)
        self.assertTrue(d.records("cannot declare a queue now; its consumer retries", queue=qb), d.tail())
        self.assertTrue(d.running())
        self.assertEqual(d.records("connection lost"), [])

        consuming = len(d.records("consuming", queue=qb))
        t_start = time.monotonic()
        await asyncio.to_thread(b.start)
        booted = time.monotonic() - t_start
        await d.wait_for_record("consuming", queue=qb, count=consuming + 1, timeout=60)
        resumed = time.monotonic() - t_start
        sys.stderr.write("CLUSTER-RESULT node B boot %.1fs; queue B consumed again %.1fs after its start "
                         "(reconnect.max 1s)\n" % (booted, resumed))
        await self.wait_handled(rec_b, await self.publish_to(a, "onb", 5))
        deadline = time.monotonic() + 10
        while (await self.get(port, "/readyz"))[2] != "ready\n":
            if time.monotonic() > deadline:
                self.fail("readyz still degraded: %r" % ((await self.get(port, "/readyz")),))
            await asyncio.sleep(0.2)
        self.assertEqual(d.records("connection lost"), [])
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
