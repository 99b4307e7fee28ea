"""TLS to the broker (amqps:// URLs and `broker.tls`).

Two RabbitMQ nodes of our own (broker_node.BrokerNode), each with a plain
listener (to publish test events) and a TLS listener, share a throw-away PKI
made with openssl (a CA, a server certificate for localhost/127.0.0.1, a
client certificate) plus an unrelated second CA:
  - `open` node: TLS without client certificates;
  - `mtls` node: ssl_options.verify = verify_peer, fail_if_no_peer_cert = true.
AMQP authentication stays user/password (PLAIN) in every case.
"""
import asyncio
import os
import re
import shutil
import time
import unittest

from harness import RouterTestCase, run_check

from broker_node import (BrokerNode, TlsOptions, free_port, http_get, make_ca, make_test_pki,
                         publish_events)

TLS_ERROR_RE = re.compile(r"TLS|SSL|certificate", re.I)


class TlsTest(RouterTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.pki = make_test_pki()
        cls.addClassCleanup(shutil.rmtree, cls.pki.dir, True)
        cls.other_ca, _ = make_ca(cls.pki.dir, "other-ca", cn="unrelated CA")
        os.chmod(cls.other_ca, 0o644)
        p = cls.pki
        cls.open_node = BrokerNode(tls=TlsOptions(p.ca_cert, p.server_cert, p.server_key))
        cls.addClassCleanup(cls.open_node.close)
        cls.mtls_node = BrokerNode(tls=TlsOptions(p.ca_cert, p.server_cert, p.server_key, verify_peer=True,
                                                  fail_if_no_peer_cert=True))
        cls.addClassCleanup(cls.mtls_node.close)
        # Boot both at once.
        cls.open_node.launch()
        cls.mtls_node.launch()
        cls.open_node.wait_ready()
        cls.mtls_node.wait_ready()

    def tls_config(self, node, tls, short, http=False):
        q = self.queue_name(short)
        rec = self.recorder("rec", events=["#"])
        cfg = self.config([{"name": q, "bindings": ["t.*"], "handlers": [rec]}])
        cfg["broker"] = {"url": node.amqps_url(), "heartbeat": "10s", "tls": tls,
                         "reconnect": {"initial": "200ms", "max": "1s"}}
        if http:
            self.http_port = free_port()
            cfg["http"] = {"listen": "127.0.0.1:%d" % self.http_port}
        return q, rec, self.write_config(cfg)

    async def handles_an_event(self, node, d, q):
        ev = self.make_event("t.hello")
        await publish_events(node.url, self.exchange, [ev])
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack", timeout=20)
        rows = await asyncio.to_thread(node.ctl_json, "list_queues", "name", "messages", "consumers")
        self.assertIn({"name": q, "messages": 0, "consumers": 1}, rows)

    async def daemon_connections(self, node):
        rows = await asyncio.to_thread(node.ctl_json, "list_connections", "ssl", "client_properties",
                                       "peer_cert_subject")
        def props(r):  # [[key, type, value], ...]
            return {e[0]: e[2] for e in (r.get("client_properties") or []) if len(e) == 3}
        return [r for r in rows if props(r).get("connection_name") == "event-router"]

    async def assert_refused(self, d, what):
        """The daemon does not get ready, logs a TLS/certificate error and keeps retrying."""
        recs = await d.wait_for_record("broker unavailable, retrying", count=2, timeout=20)
        reasons = [r.fields.get("reason", "") for r in recs]
        self.assertTrue(all(TLS_ERROR_RE.search(x) for x in reasons),
                        "%s: the error does not mention TLS/certificates: %r" % (what, reasons))
        self.assertFalse(d.records("ready"), d.tail())
        self.assertTrue(d.running(), d.tail())
        for r in recs:
            self.assertNotIn(":guest@", r.line)
        return reasons

    # (a) ---------------------------------------------------------------------------

    async def test_amqps_with_the_right_ca_connects_and_handles(self):
        node = self.open_node
        q, rec, path = self.tls_config(node, {"ca_file": self.pki.ca_cert}, "ok")
        d = await self.start_daemon(path, ready_timeout=30)
        connected = d.records("connected")
        self.assertTrue(connected[0].fields["broker"].startswith("amqps://guest:****@localhost:%d" % node.tls_port),
                        connected[0].line)
        await self.handles_an_event(node, d, q)
        conns = await self.daemon_connections(node)
        self.assertEqual([c["ssl"] for c in conns], [True], conns)
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_verify_peer_false_accepts_an_unknown_ca(self):
        node = self.open_node
        q, rec, path = self.tls_config(node, {"ca_file": self.other_ca, "verify_peer": False,
                                              "verify_hostname": False}, "noverify")
        d = await self.start_daemon(path, ready_timeout=30)
        await self.handles_an_event(node, d, q)
        self.assertEqual(await d.stop(), 0, d.tail())

    # (b) ---------------------------------------------------------------------------

    async def test_wrong_ca_is_refused_clearly_and_retried(self):
        node = self.open_node
        q, rec, path = self.tls_config(node, {"ca_file": self.other_ca}, "wrongca", http=True)
        p = await asyncio.to_thread(run_check, path)
        self.assertEqual(p.returncode, 0, "--check must not contact the broker: " + p.stdout + p.stderr)
        d = await self.start_daemon(path, wait_ready=False)
        await self.assert_refused(d, "wrong CA")
        st, _, body = await asyncio.to_thread(http_get, "http://127.0.0.1:%d/readyz" % self.http_port)
        self.assertEqual(st, 503, body)
        self.assertEqual(await self.daemon_connections(node), [])
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_hostname_mismatch_is_refused(self):
        # The certificate names localhost and 127.0.0.1; 127.0.0.2 is neither.
        node = self.open_node
        q, rec, path = self.tls_config(node, {"ca_file": self.pki.ca_cert}, "badhost")
        with open(path) as f:
            text = f.read()
        path = self.write_config(text.replace("@localhost:%d" % node.tls_port, "@127.0.0.2:%d" % node.tls_port))
        d = await self.start_daemon(path, wait_ready=False)
        await self.assert_refused(d, "hostname mismatch")
        self.assertEqual(await d.stop(), 0, d.tail())

    # (c) ---------------------------------------------------------------------------

    async def test_client_certificate_required_by_the_broker(self):
        node = self.mtls_node
        # Without a client certificate: refused, retried, never ready.
        q, rec, path = self.tls_config(node, {"ca_file": self.pki.ca_cert}, "nocert")
        d = await self.start_daemon(path, wait_ready=False)
        recs = await d.wait_for_record("broker unavailable, retrying", count=2, timeout=20)
        self.assertFalse(d.records("ready"), d.tail())
        self.assertTrue(d.running(), d.tail())
        self.assertEqual(await self.daemon_connections(node), [])
        self.assertEqual(await d.stop(), 0, d.tail())
        self.no_cert_reasons = [r.fields.get("reason", "") for r in recs]

        # With one: connects (still PLAIN user/password for AMQP) and handles.
        q2, rec2, path2 = self.tls_config(node, {"ca_file": self.pki.ca_cert, "cert_file": self.pki.client_cert,
                                                 "key_file": self.pki.client_key}, "withcert")
        d2 = await self.start_daemon(path2, ready_timeout=30)
        await self.handles_an_event(node, d2, q2)
        conns = await self.daemon_connections(node)
        self.assertEqual(len(conns), 1, conns)
        self.assertTrue(conns[0]["ssl"])
        self.assertIn("er-test-client", str(conns[0].get("peer_cert_subject")))
        self.assertEqual(await d2.stop(), 0, d2.tail())

    async def test_missing_client_certificate_error_mentions_tls(self):
        node = self.mtls_node
        q, rec, path = self.tls_config(node, {"ca_file": self.pki.ca_cert}, "nocertmsg")
        d = await self.start_daemon(path, wait_ready=False)
        await self.assert_refused(d, "no client certificate")
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_client_key_not_matching_is_refused_at_start_or_connect(self):
        node = self.mtls_node
        # The server's key with the client's certificate.
        q, rec, path = self.tls_config(node, {"ca_file": self.pki.ca_cert, "cert_file": self.pki.client_cert,
                                              "key_file": self.pki.server_key}, "badkey")
        d = await self.start_daemon(path, wait_ready=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and d.running() and len(d.records("broker unavailable, retrying")) < 2:
            await asyncio.sleep(0.1)
        self.assertFalse(d.records("ready"), d.tail())
        self.assertRegex(d.log(), TLS_ERROR_RE)
        await d.stop()


if __name__ == "__main__":
    unittest.main()
