"""Every verdict of every handler kind, end to end: exec exit codes (0 ack,
75 retry, 65 dead-letter at once, other codes, signals and timeouts retry) and
plugin verdicts (ack, retry, retry with a requested delay rounded up to a
configured delay step, dead-letter with the plugin's reason)."""
import asyncio
import json
import os
import subprocess
import tempfile
import time
import unittest

from harness import BUILD_DIR, HERE, SOURCE_DIR, RouterTestCase

ATTEMPTS_HANDLER = os.path.join(HERE, "handlers", "attempts.py")
PLUGIN_SOURCE = os.path.join(HERE, "handlers", "payload_verdict_plugin.c")
VERDICT_PLUGIN = os.path.join(BUILD_DIR, "test-plugins", "verdict_plugin.so")

# The queue's retry policy: steps 100 ms (attempt 2) and 800 ms (attempt 3+).
RETRY = {"max_attempts": 4, "delay": "100ms", "multiplier": 8, "max_delay": "800ms"}
STEPS_MS = (100, 800)

_PLUGIN_DIR = None


def build_payload_plugin() -> str:
    """Compiles handlers/payload_verdict_plugin.c once per process."""
    global _PLUGIN_DIR
    if _PLUGIN_DIR is None:
        _PLUGIN_DIR = tempfile.mkdtemp(prefix="er-it-plugin-")
    out = os.path.join(_PLUGIN_DIR, "payload_verdict_plugin.so")
    if not os.path.exists(out):
        p = subprocess.run(["cc", "-shared", "-fPIC", "-fvisibility=hidden", "-O1", "-Wall",
                            "-I" + os.path.join(SOURCE_DIR, "include"), "-o", out, PLUGIN_SOURCE],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise AssertionError("cannot build %s:\n%s%s" % (PLUGIN_SOURCE, p.stdout, p.stderr))
    return out


def read_jsonl(path):
    """The plugin's record lines."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class VerdictsTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.exec_rec = self.record_file("exec")
        self.slow_rec = self.record_file("slow")
        self.plugin_rec = os.path.join(self.tmp, "plugin.jsonl")
        plugin = await asyncio.to_thread(build_payload_plugin)
        handlers = [
            {"name": "exec-h", "events": ["ex.*"], "exec": [ATTEMPTS_HANDLER, self.exec_rec], "timeout": "20s"},
            # Times out after 300 ms; two attempts, so a timeout ends in the DLQ with its detail.
            {"name": "slow-h", "events": ["slow.*"], "exec": [ATTEMPTS_HANDLER, self.slow_rec],
             "timeout": "300ms", "kill_grace": "200ms",
             "retry": {"max_attempts": 2, "delay": "100ms", "multiplier": 8, "max_delay": "800ms"}},
            {"name": "plugin-h", "events": ["pl.*"], "plugin": plugin, "config": {"record": self.plugin_rec}},
            {"name": "verdict-h", "events": ["vp.*"], "plugin": VERDICT_PLUGIN},
        ]
        self.cfg = self.config([{"name": self.q, "bindings": ["ex.*", "slow.*", "pl.*", "vp.*"],
                                 "retry": RETRY, "handlers": handlers}])
        self.daemon = await self.start_daemon(self.write_config(self.cfg))

    # -- helpers -------------------------------------------------------------------

    async def assert_settled_clean(self):
        """Work queue empty and nothing unacked, no dead letter, delay queues empty."""
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.dlq), 0, "unexpected dead letter")
        for ms in STEPS_MS:
            self.assertEqual(await self.message_count("%s.retry.%d" % (self.q, ms)), 0)

    async def plugin_calls(self, count, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            recs = read_jsonl(self.plugin_rec)
            if len(recs) >= count:
                return recs
            if time.monotonic() > deadline:
                self.fail("plugin calls: wanted %d, have %r%s" % (count, recs, self._daemon_tail()))
            await asyncio.sleep(0.05)

    def attempts_of(self, recs, event_id):
        return [int(r["env"]["ATTEMPT"]) for r in recs if r["env"]["EVENT_ID"] == event_id]

    # -- exec ------------------------------------------------------------------------

    async def test_exec_exit_0_acks(self):
        ev = self.make_event("ex.ok", {"actions": [0]})
        await self.publish(ev)
        recs = await self.wait_records(self.exec_rec, 1)
        self.assertEqual(recs[0]["env"]["ATTEMPT"], "1")
        handled = await self.daemon.wait_for_record("handled", event_id=ev["event_id"])
        self.assertEqual(handled[0].fields.get("outcome"), "ack", handled[0].line)
        await self.assert_settled_clean()
        await asyncio.sleep(0.3)
        self.assertEqual(len(self.read_records(self.exec_rec)), 1, "acked event was handled again")
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exec_exit_75_retries(self):
        ev = self.make_event("ex.tempfail", {"actions": [75, 0]})
        await self.publish(ev)
        recs = await self.wait_records(self.exec_rec, 2)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        self.assertEqual(recs[0]["body"], recs[1]["body"], "the retry carries another body")
        self.assertGreaterEqual(recs[1]["time"] - recs[0]["time"], STEPS_MS[0] / 1000.0)
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertEqual(retried[0].fields.get("attempt"), "1", retried[0].line)
        self.assertIn("75", retried[0].fields.get("detail", ""), retried[0].line)
        outcomes = [r.fields.get("outcome") for r in
                    await self.daemon.wait_for_record("handled", count=2, event_id=ev["event_id"])]
        self.assertEqual(outcomes, ["retry", "ack"])
        await self.assert_settled_clean()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exec_exit_65_dead_letters_at_once(self):
        ev = self.make_event("ex.reject", {"actions": [65, 0], "stderr": "bad data here"})
        body = await self.publish(ev)
        dead = await self.get_all(self.dlq, expect=1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0].body, body)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "handler_failed", h)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        self.assertEqual(h.get("x-death-handler"), "exec-h", h)
        self.assertIn("65", str(h.get("x-death-detail")), h)
        self.assertIn("bad data here", str(h.get("x-death-detail")), h)
        await asyncio.sleep(0.5)  # more than the first retry step
        self.assertEqual(self.attempts_of(self.read_records(self.exec_rec), ev["event_id"]), [1], "65 was retried")
        self.assertEqual(self.daemon.records("retrying later", event_id=ev["event_id"]), [])
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exec_exit_1_retries(self):
        ev = self.make_event("ex.fail", {"actions": [1, 0]})
        await self.publish(ev)
        recs = await self.wait_records(self.exec_rec, 2)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertIn("exit code 1", retried[0].fields.get("detail", ""), retried[0].line)
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.assert_settled_clean()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exec_killed_by_signal_retries(self):
        ev = self.make_event("ex.crash", {"actions": ["signal:9", 0]})
        await self.publish(ev)
        recs = await self.wait_records(self.exec_rec, 2)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertRegex(retried[0].fields.get("detail", ""), r"(?i)signal 9|SIGKILL", retried[0].line)
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.assert_settled_clean()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_exec_timeout_retries_then_dead_letters_with_timed_out(self):
        ev = self.make_event("slow.job", {"actions": ["sleep:5"]})
        body = await self.publish(ev)
        recs = await self.wait_records(self.slow_rec, 2)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertIn("timed out", retried[0].fields.get("detail", ""), retried[0].line)
        # max_attempts 2 (the handler's own retry): the second timeout ends it.
        dead = await self.get_all(self.dlq, expect=1)
        self.assertEqual(dead[0].body, body)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "max_attempts", h)
        self.assertEqual(int(h.get("x-attempts")), 2, h)
        self.assertEqual(h.get("x-death-handler"), "slow-h", h)
        self.assertIn("timed out", str(h.get("x-death-detail")), h)
        self.assertIn("timed out", str(h.get("x-last-error", h.get("x-death-detail"))), h)
        self.assertEqual(self.read_records(self.slow_rec, "done"), [], "a timed-out handler was not stopped")
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    # -- plugins ---------------------------------------------------------------------

    async def test_plugin_ack(self):
        ev = self.make_event("pl.ok", {"v": "V1=ack;"})
        await self.publish(ev)
        calls = await self.plugin_calls(1)
        self.assertEqual([(c["event_id"], c["attempt"]) for c in calls], [(ev["event_id"], 1)])
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack", handler="plugin-h")
        await self.assert_settled_clean()
        await asyncio.sleep(0.3)
        self.assertEqual(len(read_jsonl(self.plugin_rec)), 1)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_retry_uses_the_policy_delay(self):
        ev = self.make_event("pl.retry", {"v": "V1=retry;V2=ack;"})
        await self.publish(ev)
        calls = await self.plugin_calls(2)
        self.assertEqual([c["attempt"] for c in calls], [1, 2])
        self.assertGreaterEqual(calls[1]["time"] - calls[0]["time"], STEPS_MS[0] / 1000.0)
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        # The first step (100 ms) plus at most 10% jitter: it went to <queue>.retry.100.
        self.assertTrue(100 <= int(retried[0].fields["next_attempt_in_ms"]) <= 110, retried[0].line)
        self.assertIn("payload asked to retry", retried[0].fields.get("detail", ""))
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.assert_settled_clean()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_retry_with_delay_rounds_up_to_a_step(self):
        # 500 ms requested, steps 100/800: the daemon waits the 800 ms step.
        ev = self.make_event("pl.retry", {"v": "V1=retry:500;V2=ack;"})
        await self.publish(ev)
        calls = await self.plugin_calls(2)
        self.assertEqual([c["attempt"] for c in calls], [1, 2])
        self.assertGreaterEqual(calls[1]["time"] - calls[0]["time"], 0.8)
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertTrue(800 <= int(retried[0].fields["next_attempt_in_ms"]) <= 880, retried[0].line)
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.assert_settled_clean()
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_retry_with_delay_beyond_the_largest_step(self):
        # 3 s requested, largest step 800 ms: the largest step (no queue is made on the fly).
        ev = self.make_event("pl.retry", {"v": "V1=retry:3000;V2=ack;"})
        await self.publish(ev)
        retried = await self.daemon.wait_for_record("retrying later", event_id=ev["event_id"])
        self.assertTrue(800 <= int(retried[0].fields["next_attempt_in_ms"]) <= 880, retried[0].line)
        calls = await self.plugin_calls(2)
        self.assertEqual([c["attempt"] for c in calls], [1, 2])
        self.assertGreaterEqual(calls[1]["time"] - calls[0]["time"], 0.8)
        await self.daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.assert_settled_clean()
        self.assertIsNone(await self.message_count("%s.retry.3000" % self.q), "a delay queue was made on the fly")
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_dead_letter_with_reason(self):
        ev = self.make_event("pl.bad", {"v": "V1=dead:speaker-xyz-unknown;"})
        body = await self.publish(ev)
        dead = await self.get_all(self.dlq, expect=1)
        self.assertEqual(dead[0].body, body)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "handler_failed", h)
        self.assertEqual(h.get("x-death-detail"), "speaker-xyz-unknown", h)
        self.assertEqual(h.get("x-death-handler"), "plugin-h", h)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        await asyncio.sleep(0.3)
        self.assertEqual([c["attempt"] for c in read_jsonl(self.plugin_rec)], [1], "dead-lettered event retried")
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_plugin_retries_exhausted(self):
        ev = self.make_event("pl.retry", {"v": "V1=retry;V2=retry;V3=retry;V4=retry;"})
        await self.publish(ev)
        dead = await self.get_all(self.dlq, expect=1, timeout=30)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "max_attempts", h)
        self.assertEqual(int(h.get("x-attempts")), 4, h)
        self.assertIn("gave up after 4 attempts; last error: ", str(h.get("x-death-detail")), h)
        self.assertIn("payload asked to retry (attempt 4)", str(h.get("x-death-detail")), h)
        self.assertEqual([c["attempt"] for c in read_jsonl(self.plugin_rec)], [1, 2, 3, 4])
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)

    async def test_verdict_plugin_dead_letters_json_bodies_with_its_reason(self):
        # tests/plugins/verdict_plugin.so picks its verdict from the whole body
        # ("ack", "retry", ...); through the daemon bodies are JSON objects, so
        # it answers ER_DEAD_LETTER "unexpected body".
        ev = self.make_event("vp.any")
        body = await self.publish(ev)
        dead = await self.get_all(self.dlq, expect=1)
        self.assertEqual(dead[0].body, body)
        h = dead[0].headers
        self.assertEqual(h.get("x-death-reason"), "handler_failed", h)
        self.assertEqual(h.get("x-death-detail"), "unexpected body", h)
        self.assertEqual(h.get("x-death-handler"), "verdict-h", h)
        self.assertEqual(int(h.get("x-attempts")), 1, h)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.daemon.stop(), 0)


if __name__ == "__main__":
    unittest.main()
