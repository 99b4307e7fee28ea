"""Worker handlers (`worker:`, docs/worker-protocol.md) through the real broker,
with handlers/raw_worker.py, a worker written against the raw protocol: every
verdict, pipelining, every way a worker can misbehave (nothing lost, nothing
acked twice, the daemon stays up, the restart shows in the metrics and
/readyz), user prints, a protocol mismatch, SIGTERM drain and SIGHUP."""
import asyncio
import json
import os
import re
import signal
import time

from broker_node import free_port, http_get
from harness import HERE, RouterTestCase, run_check

RAW_WORKER = os.path.join(HERE, "handlers", "raw_worker.py")
PYTHON = "/usr/bin/python3"
RETRY = {"max_attempts": 3, "delay": "100ms", "multiplier": 1}


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric(text, name, **labels):
    """The value of one sample of the Prometheus text `text`, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[len(name):line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


class WorkersTest(RouterTestCase):
    def worker(self, name="w", events=("#",), args=(), **extra):
        rec = self.record_file(name)
        h = {"name": name, "events": list(events), "worker": [PYTHON, RAW_WORKER, rec, *args],
             "restart": {"initial": "100ms", "max": "1s"}}
        h.update(extra)
        return h, rec

    async def start(self, handlers, prefetch=10, http=False, **top):
        self.q = self.queue_name("work")
        cfg = self.config([{"name": self.q, "bindings": ["#"], "prefetch": prefetch, "retry": RETRY,
                            "handlers": handlers}], **top)
        if http:
            self.http_port = free_port()
            cfg["http"] = {"listen": "127.0.0.1:%d" % self.http_port}
        self.cfg = cfg
        self.cfg_path = self.write_config(cfg)
        self.daemon = await self.start_daemon(self.cfg_path)
        return self.daemon

    async def get(self, path):
        return await asyncio.to_thread(http_get, "http://127.0.0.1:%d%s" % (self.http_port, path))

    async def wait_for(self, what, fn, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            v = fn()
            if v:
                return v
            if time.monotonic() > deadline:
                self.fail("timed out waiting for %s%s" % (what, self._daemon_tail()))
            await asyncio.sleep(0.05)

    def acks(self, event_id):
        return self.daemon.records("handled", event_id=event_id, outcome="ack")

    async def assert_all_acked_once(self, events):
        for ev in events:
            await self.wait_for("the ack of %s" % ev["event_id"], lambda: self.acks(ev["event_id"]))
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(await self.message_count(self.q + ".dlq"), 0)
        for ev in events:
            self.assertEqual(len(self.acks(ev["event_id"])), 1, "acked more than once: %s" % ev["event_id"])
        self.assertTrue(self.daemon.running())

    # -- verdicts ------------------------------------------------------------------

    async def test_every_verdict(self):
        h, rec = self.worker()
        await self.start([h])
        ack = self.make_event("job.ack", {"verdict": "ack"})
        retry = self.make_event("job.retry", {"verdicts": ["retry", "ack"], "reason": "db_down",
                                              "detail": "connection refused"})
        dead = self.make_event("job.dead", {"verdict": "dead_letter", "reason": "bad_payload",
                                            "detail": "speaker_id missing"})
        bad_emit = self.make_event("job.emit", {"verdict": "ack", "emit": [{"payload": {}}]})
        for ev in (ack, retry, dead, bad_emit):
            await self.publish(ev)
        dlq = await self.get_all(self.q + ".dlq", expect=2)
        by_id = {m.message_id: m for m in dlq}
        self.assertEqual(set(by_id), {dead["event_id"], bad_emit["event_id"]})
        hd = by_id[dead["event_id"]].headers
        self.assertEqual(hd.get("x-death-reason"), "bad_payload", hd)
        self.assertEqual(hd.get("x-death-detail"), "speaker_id missing", hd)
        self.assertEqual(json.loads(by_id[dead["event_id"]].body), dead)
        hd = by_id[bad_emit["event_id"]].headers
        self.assertEqual(hd.get("x-death-reason"), "emit_invalid", hd)
        self.assertIn("emit[0]", hd.get("x-death-detail"), hd)
        # The retry went through the delay queue and came back as attempt 2.
        await self.wait_for("attempt 2", lambda: [r for r in read_jsonl(rec)
                                                  if r["phase"] == "start" and r["event_id"] == retry["event_id"]
                                                  and r["attempt"] == 2])
        await self.assert_all_acked_once([ack, retry])
        retried = self.daemon.records("handled", event_id=retry["event_id"], outcome="retry")
        self.assertEqual(len(retried), 1)
        self.assertIn("connection refused", retried[0].fields.get("detail", ""))
        # What the worker was given: the metadata exec handlers get, and the body.
        starts = [r for r in read_jsonl(rec) if r["phase"] == "start" and r["event_id"] == ack["event_id"]]
        self.assertEqual(len(starts), 1)
        meta = starts[0]["meta"]
        self.assertEqual(meta["event_type"], "job.ack")
        self.assertEqual(meta["correlation_id"], ack["correlation_id"])
        self.assertEqual(meta["aggregate_id"], ack["aggregate_id"])
        self.assertEqual(meta["aggregate_type"], ack["aggregate_type"])
        self.assertEqual(meta["routing_key"], "job.ack")
        self.assertEqual(meta["exchange"], self.exchange)
        self.assertEqual(meta["queue"], self.q)
        self.assertEqual(meta["attempt"], 1)
        self.assertIs(meta["redelivered"], False)
        # One process did it all.
        self.assertEqual(len({r["pid"] for r in read_jsonl(rec)}), 1)

    async def slow_events(self, count, sleep_ms, **worker):
        """`count` slow events through one worker handler: their start records."""
        h, rec = self.worker(**worker)
        await self.start([h])
        events = [self.make_event("job.slow", {"sleep_ms": sleep_ms}) for _ in range(count)]
        for ev in events:
            await self.publish(ev)
        await self.assert_all_acked_once(events)
        starts = [r for r in read_jsonl(rec) if r["phase"] == "start"]
        self.assertEqual(len(starts), count)
        return starts

    async def test_pipelining_in_one_process(self):
        starts = await self.slow_events(4, 1500, concurrency=4)
        self.assertEqual(len({r["pid"] for r in starts}), 1)
        # The worker's own count: all four were in flight in it at once.
        self.assertEqual(max(r["inflight"] for r in starts), 4, starts)

    async def test_events_spread_over_processes(self):
        starts = await self.slow_events(4, 1000, processes=2, concurrency=2)
        self.assertEqual(len({r["pid"] for r in starts}), 2, starts)
        self.assertLessEqual(max(r["inflight"] for r in starts), 2, starts)

    # -- misbehaviour ----------------------------------------------------------------

    async def misbehave(self, payload, reason, bad_retried=True, **extra):
        """One bad event among good ones: all acked once, the process replaced,
        the restart counted under `reason`."""
        h, rec = self.worker(concurrency=4, **extra)
        await self.start([h], http=True)
        ready = [r for r in read_jsonl(rec) if r["phase"] == "ready"]
        self.assertEqual(len(ready), 1)
        bad = self.make_event("job.bad", dict(payload, sleep_ms=300))
        good = [self.make_event("job.good", {"sleep_ms": 600}) for _ in range(3)]
        for ev in [good[0], bad, *good[1:]]:
            await self.publish(ev)
        await self.assert_all_acked_once([bad, *good])
        # The bad event was retried as attempt 2, by a new process.
        failed = self.daemon.records("handled", event_id=bad["event_id"], outcome="retry")
        self.assertEqual(len(failed), 1 if bad_retried else 0)
        self.assertEqual(len(self.daemon.records("worker process failed; restarting", handler="w", reason=reason)),
                         1, self.daemon.tail())
        pids = {r["pid"] for r in read_jsonl(rec) if r["phase"] == "ready"}
        self.assertGreaterEqual(len(pids), 2, "no new process")
        _, _, body = await self.get("/metrics")
        self.assertGreaterEqual(metric(body, "event_router_worker_restarts_total", handler="w", reason=reason) or 0,
                                1, body)
        self.assertEqual(metric(body, "event_router_worker_processes_up", handler="w"), 1, body)
        self.assertEqual(metric(body, "event_router_worker_events_in_flight", handler="w"), 0, body)
        status, _, text = await self.get("/readyz")
        self.assertEqual(status, 200, text)
        return rec

    async def test_crash_mid_event(self):
        await self.misbehave({"crash": True}, "worker_exited")

    async def test_hang_past_timeout(self):
        await self.misbehave({"hang": True}, "worker_timeout", timeout="2s")

    async def test_garbage_answer(self):
        await self.misbehave({"garbage": "this is not json"}, "protocol_error")

    async def test_non_object_answer(self):
        await self.misbehave({"garbage": "[1, 2, 3]"}, "protocol_error")

    async def test_unknown_type(self):
        await self.misbehave({"garbage": '{"type":"bogus","id":1}'}, "protocol_error")

    async def test_unknown_verdict(self):
        await self.misbehave({"verdicts": ["maybe", "ack"]}, "protocol_error")

    async def test_answer_twice(self):
        # The first answer counts; the second is an unknown id (the others in flight are retried).
        await self.misbehave({"twice": True}, "protocol_error", bad_retried=False)

    async def test_unknown_id(self):
        await self.misbehave({"unknown_id": True}, "protocol_error")

    async def test_line_over_16_mib(self):
        await self.misbehave({"huge": 17 * 1024 * 1024}, "protocol_error")

    async def test_events_wait_for_a_process_then_retry(self):
        # Down for 4 s after the crash; an event waits `timeout` (1 s) for it,
        # is retried (worker_unavailable), and its attempt 2 finds it back.
        h, rec = self.worker(restart={"initial": "4s", "max": "4s"}, timeout="1s",
                             retry={"max_attempts": 3, "delay": "5s", "multiplier": 1})
        await self.start([h])
        crash = self.make_event("job.bad", {"crash": True})
        await self.publish(crash)
        await self.daemon.wait_for_record("worker process failed; restarting", handler="w")
        waiting = self.make_event("job.good", {})
        await self.publish(waiting)
        await self.assert_all_acked_once([crash, waiting])
        retried = self.daemon.records("handled", event_id=waiting["event_id"], outcome="retry")
        self.assertEqual(len(retried), 1)
        self.assertIn("no worker process could take it within 1s", retried[0].fields["detail"])
        starts = [r for r in read_jsonl(rec) if r["phase"] == "start" and r["event_id"] == waiting["event_id"]]
        self.assertEqual([r["attempt"] for r in starts], [2])

    async def test_restarts_back_off_until_the_worker_starts_again(self):
        flag = os.path.join(self.tmp, "refuse")
        h, rec = self.worker(args=["--fail-start-if", flag], restart={"initial": "200ms", "max": "800ms"})
        await self.start([h], http=True)
        open(flag, "w").close()
        ev = self.make_event("job.bad", {"crash": True})
        await self.publish(ev)
        # Restarts fail (exit before ready) with waits doubling up to max.
        waits = await self.daemon.wait_for_record("worker process restarts after backoff", handler="w", count=4)
        self.assertEqual([r.fields["in"] for r in waits[:4]], ["200ms", "400ms", "800ms", "800ms"])
        failed = self.daemon.records("worker process failed; restarting", handler="w", reason="start_failed")
        self.assertGreaterEqual(len(failed), 2)
        self.assertIn("exit code 5", failed[0].fields["detail"])
        _, _, body = await self.get("/metrics")
        self.assertGreaterEqual(metric(body, "event_router_worker_restarts_total", handler="w",
                                       reason="start_failed"), 2, body)
        status, _, text = await self.get("/readyz")
        self.assertEqual(status, 503, text)
        os.unlink(flag)
        await self.assert_all_acked_once([ev])
        deadline = time.monotonic() + 10
        while (await self.get("/readyz"))[0] != 200:
            self.assertLess(time.monotonic(), deadline, "never ready again")
            await asyncio.sleep(0.05)

    async def test_readyz_names_a_worker_that_is_down(self):
        h, rec = self.worker(restart={"initial": "3s", "max": "3s"})
        await self.start([h], http=True)
        status, _, _ = await self.get("/readyz")
        self.assertEqual(status, 200)
        ev = self.make_event("job.bad", {"crash": True})
        await self.publish(ev)
        deadline = time.monotonic() + 10
        while True:
            status, _, text = await self.get("/readyz")
            if status == 503:
                break
            self.assertLess(time.monotonic(), deadline, "never not ready")
            await asyncio.sleep(0.05)
        self.assertIn("worker handler 'w'", text)
        _, _, body = await self.get("/metrics")
        self.assertEqual(metric(body, "event_router_worker_processes_up", handler="w"), 0, body)
        await self.assert_all_acked_once([ev])  # after the restart
        status, _, text = await self.get("/readyz")
        self.assertEqual(status, 200, text)

    # -- output ----------------------------------------------------------------------

    async def test_prints_go_to_the_log_and_not_the_protocol(self):
        h, rec = self.worker()
        await self.start([h])
        ev = self.make_event("job.print", {
            "stdout": ["hello from user code", '{"type":"result","id":1,"verdict":"dead_letter"}'],
            "stderr": ["a warning from user code"]})
        await self.publish(ev)
        await self.assert_all_acked_once([ev])
        pid = str(read_jsonl(rec)[0]["pid"])
        out = self.daemon.records("hello from user code", handler="w", stream="stdout", pid=pid)
        self.assertEqual(len(out), 1, self.daemon.tail())
        self.assertEqual(len(self.daemon.records('{"type":"result","id":1,"verdict":"dead_letter"}',
                                                 handler="w", stream="stdout")), 1)
        self.assertEqual(len(self.daemon.records("a warning from user code", handler="w", stream="stderr",
                                                 pid=pid)), 1)
        self.assertEqual(len({r["pid"] for r in read_jsonl(rec)}), 1, "the process was restarted")

    # -- start -----------------------------------------------------------------------

    async def test_protocol_mismatch_is_a_start_and_check_error(self):
        h, rec = self.worker(args=["--protocol", "2"])
        self.q = self.queue_name("work")
        path = self.write_config(self.config([{"name": self.q, "bindings": ["#"], "handlers": [h]}]))
        p = await asyncio.to_thread(run_check, path)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("worker handler 'w': speaks protocol 2, the daemon speaks 1", p.stderr)
        d = await self.start_daemon(path, wait_ready=False)
        self.assertEqual(await d.wait_exit(30), 1, d.tail())
        self.assertIn("speaks protocol 2, the daemon speaks 1", d.log())
        # Its processes did not outlive the refusals.
        for r in read_jsonl(rec):
            self.assertFalse(os.path.exists("/proc/%d" % r["pid"]) and
                             b"raw_worker" in open("/proc/%d/cmdline" % r["pid"], "rb").read())

    async def test_check_starts_and_ends_the_worker(self):
        h, rec = self.worker()
        self.q = self.queue_name("work")
        path = self.write_config(self.config([{"name": self.q, "bindings": ["#"], "handlers": [h]}]))
        p = await asyncio.to_thread(run_check, path)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("worker %s" % PYTHON, p.stdout)
        phases = [r["phase"] for r in read_jsonl(rec)]
        self.assertEqual(phases, ["ready", "eof"])

    # -- stop and reload ---------------------------------------------------------------

    async def test_sigterm_drains_then_ends_input(self):
        h, rec = self.worker()
        d = await self.start([h])
        ev = self.make_event("job.slow", {"sleep_ms": 2000})
        await self.publish(ev)
        await self.wait_for("the start", lambda: [r for r in read_jsonl(rec) if r["phase"] == "start"])
        rc = await d.stop(signal.SIGTERM)
        self.assertEqual(rc, 0, d.tail())
        self.assertEqual(len(self.acks(ev["event_id"])), 1)
        phases = [r["phase"] for r in read_jsonl(rec)]
        self.assertEqual(phases, ["ready", "start", "done", "eof"])
        await self.wait_queue_counts(self.q, 0, 0)

    async def test_stop_escalates_for_a_worker_that_ignores_the_end(self):
        h, rec = self.worker(args=["--ignore-eof", "--ignore-term"], kill_grace="500ms")
        d = await self.start([h])
        pid = read_jsonl(rec)[0]["pid"]
        self.assertEqual(await d.stop(signal.SIGTERM, timeout=15), 0, d.tail())
        self.assertEqual(len(d.records("worker process still running after end of input and kill_grace; "
                                       "sending SIGTERM", pid=str(pid))), 1, d.tail())
        self.assertEqual(len(d.records("worker process ignored SIGTERM; sending SIGKILL", pid=str(pid))), 1)
        self.assertEqual([r["phase"] for r in read_jsonl(rec)], ["ready", "eof"])
        self.assertFalse(os.path.exists("/proc/%d" % pid), "the worker outlived the daemon")

    async def test_failed_reload_keeps_the_running_worker(self):
        h, rec = self.worker()
        d = await self.start([h])
        pid = read_jsonl(rec)[0]["pid"]
        self.cfg["queues"][0]["handlers"][0]["worker"].extend(["--protocol", "2"])
        self.write_config(self.cfg)
        d.send_signal(signal.SIGHUP)
        failed = await d.wait_for_record("reload failed; keeping the running config")
        self.assertIn("speaks protocol 2, the daemon speaks 1", failed[0].fields["error"])
        ev = self.make_event("job.after", {})
        await self.publish(ev)
        await self.assert_all_acked_once([ev])
        ready = [r for r in read_jsonl(rec) if r["phase"] == "ready"]
        self.assertEqual(len(ready), 2)  # the refused one was started, and is gone
        self.assertFalse(os.path.exists("/proc/%d" % ready[1]["pid"]))
        self.assertEqual([r["pid"] for r in read_jsonl(rec) if r["phase"] == "start"], [pid])

    async def test_sighup_keeps_an_unchanged_worker(self):
        h, rec = self.worker()
        d = await self.start([h])
        pid = read_jsonl(rec)[0]["pid"]
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record("reloaded")
        ev = self.make_event("job.after", {})
        await self.publish(ev)
        await self.assert_all_acked_once([ev])
        self.assertEqual({r["pid"] for r in read_jsonl(rec)}, {pid})
        self.assertEqual([r["phase"] for r in read_jsonl(rec)], ["ready", "start", "done"])

    async def test_sighup_replaces_a_changed_worker_without_losing_its_event(self):
        h, rec = self.worker()
        d = await self.start([h])
        old_pid = read_jsonl(rec)[0]["pid"]
        slow = self.make_event("job.slow", {"sleep_ms": 2500})
        await self.publish(slow)
        await self.wait_for("the start", lambda: [r for r in read_jsonl(rec) if r["phase"] == "start"])
        self.cfg["queues"][0]["handlers"][0]["env"] = {"GENERATION": "2"}
        self.write_config(self.cfg)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record("reloaded")
        after = self.make_event("job.after", {})
        await self.publish(after)
        await self.assert_all_acked_once([slow, after])
        recs = read_jsonl(rec)
        by_event = {r["event_id"]: r["pid"] for r in recs if r["phase"] == "start"}
        self.assertEqual(by_event[slow["event_id"]], old_pid)
        self.assertNotEqual(by_event[after["event_id"]], old_pid)
        # The old process got end of input once its event was done.
        await self.wait_for("the old worker's eof", lambda: [r for r in read_jsonl(rec)
                                                             if r["phase"] == "eof" and r["pid"] == old_pid])
        old = [r["phase"] for r in read_jsonl(rec) if r["pid"] == old_pid]
        self.assertEqual(old, ["ready", "start", "done", "eof"])
        self.assertEqual(await d.stop(), 0)

    async def test_sighups_under_load_lose_nothing(self):
        # Each SIGHUP replaces both processes (their env changes) while events flow.
        h, rec = self.worker(processes=2, concurrency=4)
        d = await self.start([h])
        events = [self.make_event("job.n", {"sleep_ms": 20}) for _ in range(200)]
        for i, ev in enumerate(events):
            await self.publish(ev)
            if i % 50 == 25:
                self.cfg["queues"][0]["handlers"][0]["env"] = {"GENERATION": str(i)}
                self.write_config(self.cfg)
                d.send_signal(signal.SIGHUP)
                await d.wait_for_record("reloaded", count=i // 50 + 1)
        await self.assert_all_acked_once(events)
        self.assertEqual(len(d.records("reloaded")), 4)
        pids = {r["pid"] for r in read_jsonl(rec) if r["phase"] == "ready"}
        self.assertEqual(len(pids), 10)  # 2 at the start + 2 per reload
        # Every replaced process saw end of input and exited on it.
        await self.wait_for("8 eofs", lambda: len([r for r in read_jsonl(rec) if r["phase"] == "eof"]) == 8)
        self.assertEqual(len(d.records("worker process failed; restarting")), 0)
        self.assertEqual(await d.stop(), 0)
