"""Structured logs (`log: {format: json}`) and password hygiene.

- Every line the daemon writes to stderr is one JSON object (valid UTF-8) with
  `ts` (ISO 8601 UTC), `level` and `msg`; numeric fields (duration_ms,
  retry_in_ms, queues, ...) are JSON numbers.
- A handled event's line carries queue, event_type, event_id, correlation_id,
  handler, outcome and duration_ms.
- Handler output (quotes, backslashes, control characters, invalid UTF-8)
  cannot break a line.
- The broker password never appears: the broker connects as a throw-away user
  with a distinctive password, through a list of URLs of which the first two
  fail (nothing listening; a wrong password) so the error paths log URLs too.
"""
import asyncio
import json
import os
import re
import secrets
import unittest
from typing import Any, Dict, List
from urllib.parse import urlsplit

from harness import AMQP_URL, HERE, RECORD_HANDLER, RouterTestCase, no_retry, run_check, run_rabbitmqctl

from broker_node import free_port

EMIT_HANDLER = os.path.join(HERE, "handlers", "emit_output.py")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)$")
LEVELS = {"debug", "info", "warn", "error"}
JSON_READY_RE = r'"msg":"ready"'


def json_lines(raw: bytes) -> List[Dict[str, Any]]:
    """Parses every line strictly (UTF-8, one JSON object each); raises
    AssertionError naming the first bad line."""
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AssertionError("log line %d is not valid UTF-8 (%s): %r" % (i, e, line))
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise AssertionError("log line %d is not JSON (%s): %r" % (i, e, line))
        if not isinstance(obj, dict):
            raise AssertionError("log line %d is not a JSON object: %r" % (i, line))
        out.append(obj)
    return out


class LogsTest(RouterTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        tok = secrets.token_hex(8)
        cls.user = "er-test-%s" % secrets.token_hex(4)
        # Distinctive, and with URL-encoded characters: %21 is "!" and %2F "/".
        cls.secret = "Pw%sZq" % tok
        cls.password = cls.secret + "!/x"
        cls.password_in_url = cls.secret + "%21%2Fx"
        cls.wrong_secret = "Wr%sQk" % secrets.token_hex(8)
        run_rabbitmqctl("add_user", cls.user, cls.password)
        cls.addClassCleanup(run_rabbitmqctl, "delete_user", cls.user)
        run_rabbitmqctl("set_permissions", "-p", "/", cls.user, ".*", ".*", ".*")

    def urls(self) -> List[str]:
        u = urlsplit(AMQP_URL)
        host, port = u.hostname, u.port or 5672
        return [
            "amqp://%s:%s@127.0.0.1:%d/" % (self.user, self.password_in_url, free_port()),  # nothing listens
            "amqp://%s:%s@%s:%d/" % (self.user, self.wrong_secret, host, port),             # refused login
            "amqp://%s:%s@%s:%d/" % (self.user, self.password_in_url, host, port),          # works
        ]

    def assertNoSecrets(self, text: str, where: str) -> None:
        for s in (self.secret, self.password, self.password_in_url, self.wrong_secret):
            self.assertNotIn(s, text, "a password appears in the %s" % where)

    def make_config(self, fmt: str, level: str = "debug") -> Dict[str, Any]:
        self.q = self.queue_name("logs")
        self.emit = {"name": "emit", "events": ["log.*"], "exec": [EMIT_HANDLER]}
        self.fail_h = self.recorder("fail", events=["fail.*"], args=["--exit", "65"])
        cfg = self.config([dict({"name": self.q, "bindings": ["log.*", "fail.*", "none.*"],
                                 "handlers": [self.emit, self.fail_h]}, **no_retry())],
                          log={"format": fmt, "level": level})
        cfg["broker"] = {"urls": self.urls(), "heartbeat": "30s", "reconnect": {"initial": "200ms", "max": "1s"}}
        return cfg

    async def run_events(self, d) -> Dict[str, Dict[str, Any]]:
        evs = {
            "ok": self.make_event("log.ok", {"stdout_hex": 'out "q" \\ back\ttab\x01ctl\n'.encode().hex(),
                                             "stderr_hex": b"err line {\"level\":\"x\"}\n".hex()}),
            "fail": self.make_event("fail.x", {"stderr": 'boom "x"\nsecond line'}),
            "none": self.make_event("none.x"),
        }
        for ev in evs.values():
            await self.publish(ev)
        await self.publish_raw(b"{not json", "log.raw", message_id="raw-1")
        await self.wait_message_count(self.q + ".dlq", 3)
        await self.wait_queue_counts(self.q, 0, 0)
        return evs

    async def test_json_lines_fields_and_no_password(self):
        path = self.write_config(self.make_config("json"))
        d = await self.start_daemon(path, wait_ready=False)
        await d.wait_for_log(JSON_READY_RE, timeout=30)
        evs = await self.run_events(d)
        await d.wait_for_log(r'"msg":"handled".*%s' % evs["fail"]["event_id"])
        self.assertEqual(await d.stop(), 0, d.tail())
        with open(d.log_path, "rb") as f:
            raw = f.read()
        recs = json_lines(raw)
        self.assertGreater(len(recs), 5)
        for r in recs:
            self.assertTrue({"ts", "level", "msg"} <= set(r), r)
            self.assertRegex(r["ts"], TS_RE)
            self.assertIn(r["level"], LEVELS, r)
            self.assertIsInstance(r["msg"], str, r)
            for k, v in r.items():
                self.assertIsInstance(k, str)
                self.assertTrue(isinstance(v, (str, int, float)) and not isinstance(v, bool), (k, v))

        def find(msg, **f):
            return [r for r in recs if r["msg"] == msg and all(r.get(k) == v for k, v in f.items())]

        starting = find("starting")
        self.assertEqual(len(starting), 1, recs[:3])
        self.assertEqual(starting[0].get("queues"), 1)
        # The handled line of the good event.
        ok = evs["ok"]
        h, = find("handled", event_id=ok["event_id"])
        self.assertEqual(h["queue"], self.q)
        self.assertEqual(h["event_type"], "log.ok")
        self.assertEqual(h["correlation_id"], ok["correlation_id"])
        self.assertEqual(h["handler"], "emit")
        self.assertEqual(h["outcome"], "ack")
        self.assertIsInstance(h["duration_ms"], int)
        self.assertNotIsInstance(h["duration_ms"], bool)
        self.assertGreaterEqual(h["duration_ms"], 0)
        self.assertEqual(h["level"], "info")
        # Its output, tagged, with every odd character intact.
        out, = find('out "q" \\ back\ttab\x01ctl', stream="stdout")
        self.assertEqual((out["handler"], out["event_id"]), ("emit", ok["event_id"]))
        err, = find('err line {"level":"x"}', stream="stderr")
        self.assertEqual(err["event_id"], ok["event_id"])
        # The failing handler: dead-letter, with the stderr detail.
        fail = evs["fail"]
        h, = find("handled", event_id=fail["event_id"])
        self.assertEqual((h["handler"], h["outcome"], h["level"]), ("fail", "dead-letter", "warn"))
        self.assertIsInstance(h["duration_ms"], int)
        dl, = find("dead-lettering", event_id=fail["event_id"])
        self.assertEqual(dl["reason"], "handler_failed")
        self.assertIn('boom "x"', dl.get("detail", ""))
        self.assertTrue(find("dead-lettering", reason="unhandled", event_id=evs["none"]["event_id"]))
        self.assertTrue(find("dead-lettering", reason="invalid_json"))
        # The two bad URLs were tried and logged (masked), with numeric retry_in_ms.
        unavailable = find("broker unavailable, retrying")
        self.assertGreaterEqual(len(unavailable), 2, [r["msg"] for r in recs])
        for r in unavailable:
            self.assertIsInstance(r.get("retry_in_ms"), int, r)
        self.assertTrue(any("refused" in r.get("reason", "") for r in unavailable), unavailable)
        connected = find("connected")
        self.assertTrue(connected)
        self.assertIn(":****@", connected[0]["broker"])
        self.assertIn(self.user, connected[0]["broker"])

        text = raw.decode("utf-8")
        self.assertNoSecrets(text, "JSON log")
        self.assertNoSecrets(d.stdout(), "daemon stdout")
        self.assertNotIn(":guest@", text)

    async def test_text_format_masks_passwords_too(self):
        path = self.write_config(self.make_config("text", "debug"))
        d = await self.start_daemon(path, ready_timeout=30)
        evs = await self.run_events(d)
        await d.wait_for_record("handled", event_id=evs["fail"]["event_id"])
        self.assertEqual(await d.stop(), 0, d.tail())
        log = d.log()
        self.assertNoSecrets(log, "text log")
        self.assertIn(":****@", log)
        self.assertGreaterEqual(len(d.records("broker unavailable, retrying")), 2, d.tail())
        # --check prints the broker URL too.
        p = await asyncio.to_thread(run_check, path)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNoSecrets(p.stdout + p.stderr, "--check output")

    async def test_invalid_utf8_from_a_handler_keeps_json_lines_valid(self):
        q = self.queue_name("utf8")
        path = self.write_config(self.config(
            [{"name": q, "bindings": ["u.*"], "handlers": [{"name": "emit", "events": ["#"], "exec": [EMIT_HANDLER]}]}],
            log={"format": "json"}))
        d = await self.start_daemon(path, wait_ready=False)
        await d.wait_for_log(JSON_READY_RE, timeout=30)
        ev = self.make_event("u.x", {"stdout_hex": (b"caf\xc3\xa9 ok \xff\xfe bad \xc3\n").hex(),
                                      "stderr_hex": (b"\xe2\x82 cut\n").hex()})
        await self.publish(ev)
        await d.wait_for_log(r'"msg":"handled".*%s' % ev["event_id"])
        self.assertEqual(await d.stop(), 0, d.tail())
        with open(d.log_path, "rb") as f:
            recs = json_lines(f.read())
        outs = [r for r in recs if r.get("stream") == "stdout" and r.get("event_id") == ev["event_id"]]
        self.assertEqual(len(outs), 1, recs)
        self.assertTrue(outs[0]["msg"].startswith("caf\u00e9 ok "), outs[0])

    async def test_startup_warnings_are_json_lines_too(self):
        # A handler whose timeout reaches the broker's ack timeout gets a plan
        # warning at start; in JSON mode that must be a JSON line as well.
        q = self.queue_name("warn")
        path = self.write_config(self.config(
            [{"name": q, "bindings": ["w.*"],
              "handlers": [{"name": "slow", "events": ["#"], "exec": [RECORD_HANDLER, os.path.join(self.tmp, "r")],
                            "timeout": "1h"}]}],
            log={"format": "json"}))
        d = await self.start_daemon(path, wait_ready=False)
        await d.wait_for_log(JSON_READY_RE, timeout=30)
        self.assertEqual(await d.stop(), 0, d.tail())
        with open(d.log_path, "rb") as f:
            raw = f.read()
        self.assertIn(b"consumer acknowledgement timeout", raw, "no plan warning at all")
        recs = json_lines(raw)
        warn = [r for r in recs if "consumer acknowledgement timeout" in json.dumps(r)]
        self.assertEqual(len(warn), 1)
        self.assertEqual(warn[0]["level"], "warn")


if __name__ == "__main__":
    unittest.main()
