"""Topology: the exchange, queues, dead-letter queues and bindings the daemon declares."""
import unittest

# aio_pika via harness: it finds Debian's python3-aio-pika for another python3 too.
from harness import READY_RE, RouterTestCase, aio_pika


class TopologyTest(RouterTestCase):
    def two_queue_config(self):
        self.q_speaker = self.queue_name("speaker")
        self.q_draft = self.queue_name("draft")
        return self.config([
            {"name": self.q_speaker, "bindings": ["speaker.*", "speaker.special.#"], "prefetch": 5,
             "unhandled": "ack",
             "handlers": [{"name": "speaker-log", "events": ["speaker.*"], "plugin": "liblog_plugin.so",
                           "config": {"prefix": "speaker"}}]},
            {"name": self.q_draft, "bindings": ["draft.*"], "prefetch": 10,
             "handlers": [self.recorder("draft-rec", events=["#"])]},
        ], shutdown_timeout="5s")

    async def assert_topology(self):
        exchanges = {e["name"]: e for e in await self.exchanges()}
        self.assertIn(self.exchange, exchanges, "exchange not declared")
        ex = exchanges[self.exchange]
        self.assertEqual(ex["type"], "topic")
        self.assertIs(ex["durable"], True, "exchange must be durable: %r" % ex)
        self.assertIs(ex.get("auto_delete"), False, "exchange must not be auto-delete: %r" % ex)

        for q in (self.q_speaker, self.q_draft, self.q_speaker + ".dlq", self.q_draft + ".dlq"):
            info = await self.queue_info(q)
            self.assertIsNotNone(info, "queue %s not declared" % q)
            self.assertIs(info["durable"], True, "queue %s must be durable: %r" % (q, info))

        got = {(b["destination_name"], b["routing_key"]) for b in await self.bindings()
               if b["source_name"] == self.exchange and b["destination_kind"] == "queue"}
        self.assertEqual(got, {(self.q_speaker, "speaker.*"), (self.q_speaker, "speaker.special.#"),
                               (self.q_draft, "draft.*")})

    async def test_declares_exchange_queues_dlqs_and_bindings(self):
        d = await self.start_daemon(self.write_config(self.two_queue_config()))
        await self.assert_topology()
        for q in (self.q_speaker, self.q_draft):
            info = await self.queue_info(q)
            self.assertGreaterEqual(info["consumers"], 1, "nobody consumes %s: %r" % (q, info))
        self.assertEqual(await d.stop(), 0, d.tail())
        self.assertNoPasswordLeak(d.log())

    async def test_restart_redeclares_same_topology(self):
        path = self.write_config(self.two_queue_config())
        d1 = await self.start_daemon(path)
        self.assertEqual(await d1.stop(), 0, d1.tail())
        d2 = await self.start_daemon(path)
        await self.assert_topology()
        self.assertEqual(await d2.stop(), 0, d2.tail())

    async def test_topology_survives_when_queues_exist_already(self):
        # Queues made beforehand with the same (default) properties are fine.
        cfg = self.two_queue_config()
        ch = await self.conn.channel()
        await ch.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await ch.declare_queue(self.q_speaker, durable=True)
        await ch.declare_queue(self.q_draft + ".dlq", durable=True)
        await ch.close()
        d = await self.start_daemon(self.write_config(cfg))
        await self.assert_topology()
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_conflicting_queue_arguments_fail_with_a_clear_error(self):
        q = self.queue_name("conflict")
        ch = await self.conn.channel()
        await ch.declare_queue(q, durable=True, arguments={"x-max-length": 5})
        await ch.close()
        cfg = self.config([{"name": q, "bindings": ["conflict.*"],
                            "handlers": [self.recorder("rec", events=["#"])]}])
        d = await self.start_daemon(self.write_config(cfg), wait_ready=False)
        rc = await d.wait_exit(30)
        self.assertIsNotNone(rc, "daemon still running 30s after a queue declare conflict:\n" + d.tail())
        self.assertNotEqual(rc, 0, d.tail())
        log = d.log()
        error_lines = [line for line in log.splitlines() if q in line and "x-max-length" in line]
        self.assertTrue(error_lines, "no log line names both the queue %r and the argument x-max-length:\n%s"
                        % (q, log))
        self.assertNotRegex(log, READY_RE, "daemon said ready despite the conflict")
        self.assertNoPasswordLeak(log)
        # The pre-existing queue is left alone.
        info = await self.queue_info(q)
        self.assertIsNotNone(info)
        args = {a[0]: a[-1] for a in info["arguments"]} if isinstance(info["arguments"], list) \
            else dict(info["arguments"] or {})
        self.assertEqual(args.get("x-max-length"), 5, info)

    async def test_password_not_logged_when_login_fails(self):
        q = self.queue_name("badlogin")
        cfg = self.config([{"name": q, "bindings": ["x.*"], "handlers": [self.recorder("rec", events=["#"])]}])
        secret = "WrongPw-" + self.prefix[-6:]
        cfg["broker"]["url"] = "amqp://guest:%s@127.0.0.1:5672/" % secret
        d = await self.start_daemon(self.write_config(cfg), wait_ready=False)
        # It either gives up or keeps retrying; either way it says something at warn/error.
        await d.wait_for_log(r"(?m)^\S+ (warn|error|fatal) ", timeout=20)
        if d.running():
            await d.stop()
        log = d.log()
        self.assertNotIn(secret, log, "broker password in the log")
        self.assertNotRegex(log, READY_RE)


if __name__ == "__main__":
    unittest.main()
