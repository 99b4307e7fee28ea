"""Delayed retries: backoff between attempts, one delay queue per step (a
short delay is never stuck behind a long one), retries survive a daemon
SIGKILL, exhausted retries end in the DLQ with every header and the original
properties (and replay from there starts at attempt 1), and a dead-letter copy
the broker refuses never loses the original."""
import asyncio
import json
import re
import os
import signal
import subprocess
import time
import unittest
from datetime import datetime, timezone

import aio_pika

from harness import BINARY, HERE, RouterTestCase, rabbitmqctl_json, run_check, run_rabbitmqctl

ATTEMPTS_HANDLER = os.path.join(HERE, "handlers", "attempts.py")


def parse_iso(s: str) -> datetime:
    return datetime.strptime(str(s), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


class RetryTest(RouterTestCase):
    # -- helpers -------------------------------------------------------------------

    def attempts_handler(self, name, events, **extra):
        """An exec handler running handlers/attempts.py (verdict per ATTEMPT from
        payload.actions); its record file is self.recs[name]."""
        rec = self.record_file(name)
        if not hasattr(self, "recs"):
            self.recs = {}
        self.recs[name] = rec
        h = {"name": name, "events": list(events), "exec": [ATTEMPTS_HANDLER, rec], "timeout": "20s"}
        h.update(extra)
        return h

    def attempts_of(self, recs, event_id):
        return [int(r["env"]["ATTEMPT"]) for r in recs if r["env"]["EVENT_ID"] == event_id]

    async def check_accepts(self, cfg) -> subprocess.CompletedProcess:
        path = self.write_config(cfg, "probe-%d.yaml" % int(time.monotonic() * 1e6))
        return await asyncio.to_thread(run_check, path)

    async def peek(self, queue):
        """The first ready message of `queue` and its headers (bytes decoded),
        left in the queue (basic.get, then reject with requeue)."""
        ch = await self.conn.channel()
        try:
            q = await ch.get_queue(queue, ensure=True)
            m = await q.get(no_ack=False, fail=False)
            if m is None:
                return None
            headers = {k: (bytes(v).decode() if isinstance(v, (bytes, bytearray)) else v)
                       for k, v in (m.headers or {}).items()}
            await m.reject(requeue=True)
            return m, headers
        finally:
            await ch.close()

    async def dlq_cmd(self, cfg_path, *args):
        p = await asyncio.to_thread(subprocess.run, [BINARY, "dlq", *args, "--config", cfg_path],
                                    capture_output=True, text=True, env=self.daemon_env(), timeout=60,
                                    stdin=subprocess.DEVNULL)
        return p

    # -- tests -----------------------------------------------------------------------

    async def test_retries_with_backoff_until_the_handler_succeeds(self):
        q = self.queue_name("work")
        h = self.attempts_handler("flaky", ["r.*"])
        cfg = self.config([{"name": q, "bindings": ["r.*"], "handlers": [h],
                            "retry": {"max_attempts": 5, "delay": "300ms", "multiplier": 2, "max_delay": "5s"}}])
        d = await self.start_daemon(self.write_config(cfg))
        ev = self.make_event("r.job", {"actions": [75, 75, 0]})
        await self.publish(ev)
        recs = await self.wait_records(self.recs["flaky"], 3)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2, 3])
        self.assertEqual(len({r["body"] for r in recs}), 1, "the retries carry another body")
        gaps = [recs[1]["time"] - recs[0]["time"], recs[2]["time"] - recs[1]["time"]]
        # delay * multiplier^(n-2): 300 ms before attempt 2, 600 ms before attempt 3.
        self.assertGreaterEqual(gaps[0], 0.3, gaps)
        self.assertGreaterEqual(gaps[1], 0.6, gaps)
        retried = await d.wait_for_record("retrying later", count=2, event_id=ev["event_id"])
        self.assertEqual([r.fields["attempt"] for r in retried], ["1", "2"])
        self.assertTrue(300 <= int(retried[0].fields["next_attempt_in_ms"]) <= 330, retried[0].line)
        self.assertTrue(600 <= int(retried[1].fields["next_attempt_in_ms"]) <= 660, retried[1].line)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.wait_queue_counts(q, 0, 0)
        for ms in (300, 600):
            self.assertEqual(await self.message_count("%s.retry.%d" % (q, ms)), 0)
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        await asyncio.sleep(1.0)  # longer than any step it used: nothing comes back
        self.assertEqual(len(self.read_records(self.recs["flaky"])), 3, "handled again after the ack")
        self.assertEqual(len(d.records("handled", event_id=ev["event_id"], outcome="ack")), 1)
        self.assertEqual(await d.stop(), 0)

    async def test_short_retry_is_not_stuck_behind_a_long_one(self):
        q = self.queue_name("work")
        slow = self.attempts_handler("slow", ["x.slow"],
                                     retry={"max_attempts": 3, "delay": "5s", "multiplier": 2, "max_delay": "5s"})
        fast = self.attempts_handler("fast", ["x.fast"],
                                     retry={"max_attempts": 3, "delay": "100ms", "multiplier": 2,
                                            "max_delay": "100ms"})
        cfg = self.config([{"name": q, "bindings": ["x.*"], "handlers": [slow, fast],
                            "retry": {"max_attempts": 2, "delay": "100ms", "max_delay": "100ms"}}])
        d = await self.start_daemon(self.write_config(cfg))
        a = self.make_event("x.slow", {"actions": [75, 0]})
        b = self.make_event("x.fast", {"actions": [75, 0]})
        await self.publish(a)
        await d.wait_for_record("retrying later", event_id=a["event_id"])
        await self.wait_message_count(q + ".retry.5000", 1)
        await self.publish(b)
        b_recs = await self.wait_records(self.recs["fast"], 2)
        self.assertEqual(self.attempts_of(b_recs, b["event_id"]), [1, 2])
        b_handled = await d.wait_for_record("handled", event_id=b["event_id"], outcome="ack")
        a_acks = d.records("handled", event_id=a["event_id"], outcome="ack")
        self.assertEqual(a_acks, [], "the long retry was handled before the short one")
        self.assertEqual(self.attempts_of(self.read_records(self.recs["slow"]), a["event_id"]), [1],
                         "A's second attempt came before B's")
        self.assertLess(b_recs[1]["time"] - b_recs[0]["time"], 4.0, "B waited behind A")
        # Each went to its own step's delay queue.
        steps = {r.fields["event_id"]: int(r.fields["next_attempt_in_ms"]) for r in d.records("retrying later")}
        self.assertTrue(5000 <= steps[a["event_id"]] <= 5500, steps)
        self.assertTrue(100 <= steps[b["event_id"]] <= 110, steps)
        # A comes back after its own delay.
        a_recs = await self.wait_records(self.recs["slow"], 2, timeout=20)
        self.assertEqual(self.attempts_of(a_recs, a["event_id"]), [1, 2])
        self.assertGreaterEqual(a_recs[1]["time"] - a_recs[0]["time"], 5.0)
        a_handled = await d.wait_for_record("handled", event_id=a["event_id"], outcome="ack")
        self.assertLess(d.lines().index(b_handled[0].line), d.lines().index(a_handled[0].line))
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await d.stop(), 0)

    async def test_retry_survives_sigkill_while_waiting_in_the_delay_queue(self):
        q = self.queue_name("work")
        delay_q = q + ".retry.3000"
        h = self.attempts_handler("flaky", ["k.*"])
        cfg_path = self.write_config(self.config([{"name": q, "bindings": ["k.*"], "handlers": [h],
                                                   "retry": {"max_attempts": 3, "delay": "3s", "multiplier": 1}}]))
        d = await self.start_daemon(cfg_path)
        ev = self.make_event("k.job", {"actions": [75, 0]})
        await self.publish(ev, headers={"app-header": "keep-me"})
        await self.wait_records(self.recs["flaky"], 1)
        await d.wait_for_record("retrying later", event_id=ev["event_id"])
        # The copy is confirmed in the delay queue and the original acked: kill -9 now.
        await self.wait_message_count(delay_q, 1, timeout=5)
        await self.wait_queue_counts(q, 0, 0, timeout=5)
        d.send_signal(signal.SIGKILL)
        self.assertEqual(await d.wait_exit(10), -signal.SIGKILL)
        # The copy is in the delay queue, or (on a slow machine) its 3 s
        # already ran out and the broker moved it back to the work queue. It
        # may move between two listings: count only when the delay queue
        # reads the same before and after the work queue.
        for _ in range(5):
            info = await self.queue_info(delay_q)
            self.assertIsNotNone(info, "delay queue %s missing" % delay_q)
            work = await self.queue_info(q)
            again = await self.queue_info(delay_q)
            if again["messages_ready"] == info["messages_ready"]:
                break
        self.assertEqual(info["consumers"], 0, info)
        self.assertEqual(info["messages_ready"] + work["messages_ready"], 1, (info, work))
        # What the retry copy carries.
        got = await self.peek(delay_q)
        if got is not None:  # it may just have expired into the work queue
            m, hd = got
            self.assertEqual(m.message_id, ev["event_id"])
            self.assertEqual(hd.get("x-attempt"), 2, hd)
            self.assertIn("75", str(hd.get("x-last-error")), hd)
            self.assertEqual(hd.get("x-death-handler"), "flaky", hd)
            self.assertEqual(hd.get("x-original-exchange"), self.exchange, hd)
            self.assertEqual(hd.get("x-original-routing-key"), "k.job", hd)
            self.assertEqual(hd.get("x-original-queue"), q, hd)
            self.assertLessEqual(parse_iso(hd["x-first-failed-at"]), parse_iso(hd["x-last-failed-at"]), hd)
            self.assertEqual(hd.get("app-header"), "keep-me", hd)
            # The per-message TTL: the 3 s step plus at most 10% jitter.
            self.assertIsNotNone(m.expiration, "the retry copy has no expiration")
            self.assertTrue(3000 <= round(float(m.expiration) * 1000) <= 3300, m.expiration)
        d2 = await self.start_daemon(cfg_path)
        recs = await self.wait_records(self.recs["flaky"], 2, timeout=20)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2], "the retry restarted at attempt 1")
        self.assertGreaterEqual(recs[1]["time"] - recs[0]["time"], 3.0)
        await d2.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await self.message_count(delay_q), 0)
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        self.assertEqual(await d2.stop(), 0)

    async def test_exhausted_retries_dead_letter_with_all_headers_then_replay(self):
        q = self.queue_name("work")
        dlq = q + ".dlq"
        flag = os.path.join(self.tmp, "fixed")
        h = self.attempts_handler("always-fails", ["f.*"])
        cfg_path = self.write_config(self.config([{"name": q, "bindings": ["f.*"], "handlers": [h],
                                                   "retry": {"max_attempts": 3, "delay": "100ms", "multiplier": 2,
                                                             "max_delay": "1s"}}]))
        d = await self.start_daemon(cfg_path)
        ev = self.make_event("f.job", {"actions": [1], "ok_flag": flag, "stderr": "disk on fire"})
        body = json.dumps(ev).encode()
        ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        ex = await self._exchange_for_publish()
        await ex.publish(aio_pika.Message(body=body, content_type="application/json", message_id=ev["event_id"],
                                          correlation_id=ev["correlation_id"], timestamp=ts, type="f.job",
                                          delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                          headers={"app-header": "keep-me", "app-int": 42,
                                                   "x-app-header": "dropped", "CC": ["elsewhere"]}),
                         routing_key="f.job")
        await self.wait_message_count(dlq, 1, timeout=20)
        await asyncio.sleep(0.3)
        self.assertEqual(await self.message_count(dlq), 1, "more than one dead letter")
        m, hd = await self.peek(dlq)  # stays in the DLQ for the replay below
        self.assertEqual(m.body, body)
        self.assertEqual(m.message_id, ev["event_id"])
        self.assertEqual(m.correlation_id, ev["correlation_id"])
        self.assertEqual(m.content_type, "application/json")
        self.assertEqual(m.type, "f.job")
        self.assertEqual(int(m.delivery_mode), 2)
        got_ts = m.timestamp if m.timestamp.tzinfo else m.timestamp.replace(tzinfo=timezone.utc)
        self.assertEqual(got_ts, ts)
        self.assertEqual(hd.get("app-header"), "keep-me", hd)
        self.assertEqual(hd.get("app-int"), 42, hd)
        # Headers the broker acts on (CC) and every x- header of the original are not carried.
        self.assertNotIn("x-app-header", hd)
        self.assertNotIn("CC", hd)
        self.assertEqual(hd.get("x-death-reason"), "max_attempts", hd)
        self.assertEqual(int(hd.get("x-attempts")), 3, hd)
        detail = str(hd.get("x-death-detail"))
        self.assertTrue(detail.startswith("gave up after 3 attempts; last error: "), detail)
        self.assertIn("exit code 1", detail)
        self.assertIn("disk on fire", detail)
        self.assertEqual(hd.get("x-death-handler"), "always-fails", hd)
        first, last = parse_iso(hd["x-first-failed-at"]), parse_iso(hd["x-last-failed-at"])
        # Attempt 1 failed, then 100 ms + 200 ms of delays before attempt 3 failed.
        self.assertGreaterEqual((last - first).total_seconds(), 0.29, hd)
        self.assertEqual(hd.get("x-original-exchange"), self.exchange, hd)
        self.assertEqual(hd.get("x-original-routing-key"), "f.job", hd)
        self.assertEqual(hd.get("x-original-queue"), q, hd)
        recs = self.read_records(self.recs["always-fails"])
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2, 3])

        # Fix the handler, replay: a fresh start at attempt 1.
        open(flag, "w").close()
        p = await self.dlq_cmd(cfg_path, "replay", "--queue", q)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("replayed 1 event(s)", p.stdout)
        recs = await self.wait_records(self.recs["always-fails"], 4)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2, 3, 1])
        self.assertEqual(recs[3]["action"], "0")
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await self.message_count(dlq), 0)
        self.assertEqual(await d.stop(), 0)

    async def test_burst_of_failures_each_comes_back_once(self):
        q = self.queue_name("work")
        h = self.attempts_handler("flaky", ["b.*"], concurrency=5)
        cfg = self.config([{"name": q, "bindings": ["b.*"], "prefetch": 10, "handlers": [h],
                            "retry": {"max_attempts": 3, "delay": "200ms", "multiplier": 2, "max_delay": "1s"}}])
        d = await self.start_daemon(self.write_config(cfg))
        events = [self.make_event("b.job", {"actions": [75, 0], "n": i}) for i in range(25)]
        for ev in events:
            await self.publish(ev)
        await d.wait_for_record("handled", count=25, outcome="ack", timeout=30)
        await self.wait_queue_counts(q, 0, 0)
        await asyncio.sleep(0.5)
        recs = self.read_records(self.recs["flaky"])
        for ev in events:
            self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2], ev["event_id"])
        self.assertEqual(len(d.records("handled", outcome="ack")), 25)
        self.assertEqual(await self.message_count(q + ".retry.200"), 0)
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        self.assertEqual(await d.stop(), 0)

    async def test_attempt_number_survives_a_crash_during_a_retry(self):
        # The daemon dies (SIGKILL) while attempt 2 runs: the broker redelivers
        # the retry copy, which still says attempt 2.
        q = self.queue_name("work")
        h = self.attempts_handler("flaky", ["c.*"])
        cfg_path = self.write_config(self.config([{"name": q, "bindings": ["c.*"], "handlers": [h],
                                                   "retry": {"max_attempts": 3, "delay": "100ms",
                                                             "max_delay": "100ms"}}]))
        d = await self.start_daemon(cfg_path)
        flag = os.path.join(self.tmp, "no-more-sleeping")
        ev = self.make_event("c.job", {"actions": [75, "sleep:30", 0], "ok_flag": flag})
        await self.publish(ev)
        recs = await self.wait_records(self.recs["flaky"], 2)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        d.send_signal(signal.SIGKILL)
        await d.wait_exit(10)
        # The orphaned handler (its own process group) is not ours to wait for.
        try:
            os.killpg(recs[1]["pid"], signal.SIGKILL)
        except OSError:
            pass
        await self.wait_queue_counts(q, 1, 0)
        open(flag, "w").close()  # the next run of the handler succeeds at once
        d2 = await self.start_daemon(cfg_path)
        await d2.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        recs = await self.wait_records(self.recs["flaky"], 3)
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2, 2])
        self.assertEqual(recs[2]["env"]["REDELIVERED"], "1", recs[2]["env"])
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await d2.stop(), 0)

    async def test_max_attempts_1_dead_letters_a_retry_at_once(self):
        q = self.queue_name("work")
        h = self.attempts_handler("once", ["o.*"])
        cfg = self.config([{"name": q, "bindings": ["o.*"], "handlers": [h], "retry": {"max_attempts": 1}}])
        d = await self.start_daemon(self.write_config(cfg))
        ev = self.make_event("o.job", {"actions": [75]})
        await self.publish(ev)
        dead = await self.get_all(q + ".dlq", expect=1)
        hd = dead[0].headers
        self.assertEqual(hd.get("x-death-reason"), "max_attempts", hd)
        self.assertEqual(int(hd.get("x-attempts")), 1, hd)
        self.assertTrue(str(hd.get("x-death-detail")).startswith("gave up after 1 attempt; last error: "), hd)
        self.assertEqual(d.records("retrying later"), [])
        self.assertEqual(self.attempts_of(self.read_records(self.recs["once"]), ev["event_id"]), [1])
        self.assertEqual(await d.stop(), 0)

    async def test_retry_keeps_an_empty_original_routing_key(self):
        # Published with the empty routing key (a "#" binding routes it); the
        # type comes from the envelope. The retry copy comes back through the
        # default exchange with the work queue's name as routing key: the
        # handler and the dead letter must still see the original ones.
        q = self.queue_name("work")
        h = self.attempts_handler("flaky", ["e.*"])
        cfg = self.config([{"name": q, "bindings": ["#"], "handlers": [h],
                            "retry": {"max_attempts": 2, "delay": "100ms", "max_delay": "100ms"}}])
        d = await self.start_daemon(self.write_config(cfg))
        ev = self.make_event("e.job", {"actions": [75]})
        # (harness.publish treats "" as "use the event type": publish_raw)
        await self.publish_raw(json.dumps(ev).encode(), "", message_id=ev["event_id"])
        dead = await self.get_all(q + ".dlq", expect=1)
        recs = self.read_records(self.recs["flaky"])
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 2])
        hd = dead[0].headers
        self.assertEqual(hd.get("x-death-reason"), "max_attempts", hd)
        with self.subTest("the handler's ROUTING_KEY on the retry"):
            self.assertEqual([(r["env"]["ROUTING_KEY"], r["env"]["EVENT_TYPE"]) for r in recs],
                             [("", "e.job"), ("", "e.job")], "the retry saw another routing key")
        with self.subTest("the dead letter's x-original-*"):
            self.assertEqual((hd.get("x-original-exchange"), hd.get("x-original-routing-key"),
                              hd.get("x-original-queue")), (self.exchange, "", q), hd)
        self.assertEqual(await d.stop(), 0)

    async def test_retry_copy_to_a_deleted_delay_queue_is_not_lost(self):
        # Someone deletes the delay queue while the daemon runs. The retry copy
        # is unroutable, and the broker confirms unroutable non-mandatory
        # publishes: the original must not be acked on that confirm alone. It
        # goes back to the broker (attempt 1 again), the delay queue is
        # declared again, and the event is handled in the end.
        q = self.queue_name("work")
        delay_q = q + ".retry.200"
        h = self.attempts_handler("flaky", ["g.*"])
        cfg = self.config([{"name": q, "bindings": ["g.*"], "handlers": [h],
                            "retry": {"max_attempts": 3, "delay": "200ms", "max_delay": "200ms"}}])
        d = await self.start_daemon(self.write_config(cfg))
        ch = await self.conn.channel()
        await ch.queue_delete(delay_q)
        await ch.close()
        ev = self.make_event("g.job", {"actions": [75, 0]})
        await self.publish(ev)
        await d.wait_for_record("retrying later", event_id=ev["event_id"])
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack", timeout=20)
        attempts = self.attempts_of(self.read_records(self.recs["flaky"]), ev["event_id"])
        self.assertEqual(attempts[0], 1, attempts)
        self.assertEqual(attempts[-1], 2, attempts)
        self.assertIsNotNone(await self.message_count(delay_q), "the delay queue was not declared again")
        await self.wait_queue_counts(q, 0, 0)
        self.assertEqual(await self.message_count(q + ".dlq"), 0)
        self.assertEqual(await d.stop(), 0)

    async def test_dead_letter_copy_to_a_deleted_dlq_is_not_lost(self):
        # Same with the DLQ deleted: the event ends up in the DLQ declared again
        # (once, or twice at worst: never zero times).
        q = self.queue_name("work")
        h = self.attempts_handler("rejecter", ["g.*"])
        cfg = self.config([{"name": q, "bindings": ["g.*"], "handlers": [h], "retry": {"max_attempts": 1}}])
        d = await self.start_daemon(self.write_config(cfg))
        ch = await self.conn.channel()
        await ch.queue_delete(q + ".dlq")
        await ch.close()
        ev = self.make_event("g.job", {"actions": [65]})
        await self.publish(ev)
        await d.wait_for_record("dead-lettering", event_id=ev["event_id"])
        await self.wait_message_count(q + ".dlq", 1, timeout=20)
        await self.wait_queue_counts(q, 0, 0)
        dead = await self.get_all(q + ".dlq")
        self.assertIn(len(dead), (1, 2), [m.message_id for m in dead])
        self.assertEqual({m.message_id for m in dead}, {ev["event_id"]})
        self.assertEqual(dead[0].headers.get("x-death-reason"), "handler_failed", dead[0].headers)
        self.assertEqual(await d.stop(), 0)

    async def test_refused_dead_letter_copy_keeps_the_original(self):
        q = self.queue_name("work")
        dlq = q + ".dlq"
        h = self.attempts_handler("rejecter", ["d.*"])
        dl_args = {"x-max-length": 1, "x-overflow": "reject-publish"}
        cfg = self.config([{"name": q, "bindings": ["d.*"], "handlers": [h], "dead_letter_arguments": dl_args,
                            "retry": {"max_attempts": 1}}])
        check = await self.check_accepts(cfg)
        if check.returncode != 0 and "dead_letter_arguments" in check.stdout + check.stderr:
            self.skipTest("the daemon does not know the queue key `dead_letter_arguments:` yet "
                          "(--check: %s); without it the pre-declared bounded DLQ conflicts with the "
                          "daemon's own declaration" % (check.stdout + check.stderr).strip())
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        cfg_path = self.write_config(cfg)

        # A DLQ that holds one message and refuses more, filled before the daemon starts.
        ch = await self.conn.channel(publisher_confirms=True)
        await ch.declare_queue(dlq, durable=True, arguments=dl_args)
        await ch.default_exchange.publish(aio_pika.Message(b'{"filler": true}', message_id="filler"),
                                          routing_key=dlq)
        await ch.close()
        await self.wait_message_count(dlq, 1)

        d = await self.start_daemon(cfg_path)
        ev = self.make_event("d.job", {"actions": [65]})
        await self.publish(ev)
        await d.wait_for_log(r"refused the copy", timeout=20)
        await self.wait_records(self.recs["rejecter"], 1)
        # The original is still the broker's (unacked, then handed back), the DLQ unchanged.
        info = await self.queue_info(q)
        self.assertEqual(info["messages_ready"] + info["messages_unacknowledged"], 1, info)
        got = await self.get_all(dlq)
        self.assertEqual([m.message_id for m in got], ["filler"], "the DLQ took or lost something")
        # The DLQ has room now: the event ends up there, once.
        dead = await self.get_all(dlq, expect=1, timeout=30)
        self.assertEqual([m.message_id for m in dead], [ev["event_id"]])
        self.assertEqual(dead[0].headers.get("x-death-reason"), "handler_failed", dead[0].headers)
        self.assertEqual(int(dead[0].headers.get("x-attempts")), 1, dead[0].headers)
        await self.wait_queue_counts(q, 0, 0)
        recs = self.read_records(self.recs["rejecter"])
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 1])
        self.assertEqual(recs[1]["env"]["REDELIVERED"], "1", recs[1]["env"])
        self.assertGreaterEqual(recs[1]["time"] - recs[0]["time"], 4.5, "handed back before the pause")
        info = await self.queue_info(dlq)
        args = info["arguments"]  # rabbitmqctl's JSON: [[name, type, value], ...] (or a map)
        args = {a[0]: a[2] for a in args} if isinstance(args, list) else args
        self.assertEqual(args, dl_args, info)
        await asyncio.sleep(1.0)
        self.assertEqual(await self.message_count(dlq), 0, "a second copy reached the DLQ")
        self.assertTrue(d.running())
        self.assertEqual(await d.stop(), 0)

    async def test_refused_dead_letter_copy_keeps_the_original_policy_bounded_dlq(self):
        # The same contract with a DLQ bounded by a broker policy (max-length 1,
        # overflow reject-publish) instead of queue arguments: a policy never
        # conflicts with the daemon's argument-less declaration.
        q = self.queue_name("work")
        dlq = q + ".dlq"
        h = self.attempts_handler("rejecter", ["d.*"])
        cfg_path = self.write_config(self.config([{"name": q, "bindings": ["d.*"], "handlers": [h],
                                                   "retry": {"max_attempts": 1}}]))
        policy = self.prefix + "-bounded-dlq"
        await asyncio.to_thread(run_rabbitmqctl, "set_policy", "--apply-to", "queues", "--priority", "100",
                                policy, "^%s$" % re.escape(dlq),
                                json.dumps({"max-length": 1, "overflow": "reject-publish"}))
        self.addAsyncCleanup(asyncio.to_thread, run_rabbitmqctl, "clear_policy", policy)

        d = await self.start_daemon(cfg_path)  # declares the DLQ; the policy applies to it
        deadline = time.monotonic() + 15
        while True:
            rows = await asyncio.to_thread(rabbitmqctl_json, "list_queues", "name", "policy")
            if any(r.get("name") == dlq and r.get("policy") == policy for r in rows):
                break
            self.assertLess(time.monotonic(), deadline, "policy %s never applied to %s" % (policy, dlq))
            await asyncio.sleep(0.2)
        ch = await self.conn.channel(publisher_confirms=True)
        await ch.default_exchange.publish(aio_pika.Message(b'{"filler": true}', message_id="filler"),
                                          routing_key=dlq)
        await ch.close()
        await self.wait_message_count(dlq, 1)

        ev = self.make_event("d.job", {"actions": [65]})
        await self.publish(ev)
        await d.wait_for_log(r"refused the copy", timeout=20)
        await self.wait_records(self.recs["rejecter"], 1)
        info = await self.queue_info(q)
        self.assertEqual(info["messages_ready"] + info["messages_unacknowledged"], 1,
                         "the original was acked although its dead-letter copy was refused: %r" % info)
        got = await self.get_all(dlq)  # also empties the DLQ
        self.assertEqual([m.message_id for m in got], ["filler"], "the DLQ took or lost something")
        # Handed back after ~5 s, handled again (65 again), and now the DLQ takes it: once.
        dead = await self.get_all(dlq, expect=1, timeout=30)
        self.assertEqual([m.message_id for m in dead], [ev["event_id"]])
        self.assertEqual(dead[0].headers.get("x-death-reason"), "handler_failed", dead[0].headers)
        self.assertEqual(int(dead[0].headers.get("x-attempts")), 1, dead[0].headers)
        await self.wait_queue_counts(q, 0, 0)
        recs = self.read_records(self.recs["rejecter"])
        self.assertEqual(self.attempts_of(recs, ev["event_id"]), [1, 1])
        self.assertEqual(recs[1]["env"]["REDELIVERED"], "1", recs[1]["env"])
        self.assertGreaterEqual(recs[1]["time"] - recs[0]["time"], 4.5, "handed back before the pause")
        await asyncio.sleep(1.0)
        self.assertEqual(await self.message_count(dlq), 0, "a second copy reached the DLQ")
        self.assertTrue(d.running())
        self.assertEqual(await d.stop(), 0)


if __name__ == "__main__":
    unittest.main()
