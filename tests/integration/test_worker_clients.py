"""Worker handlers on the real helpers, through the real daemon and broker:
clients/python's `event_router` (workers/py_worker.py) and clients/node's
`@event-router/worker` (workers/node_worker.js), the same tests for both:
every verdict, events in flight at once, emit (published once with the derived id, the original
settled only after; a retried handler re-emits the same id), a crash, a hang
past `timeout` and prints from user code (nothing lost, nothing acked twice,
the daemon stays up), SIGTERM drain, SIGHUP replacing a worker, and the
example handlers (config/handlers/rag_worker.py, the guide's handlers) with
events published as the services publish them."""
import asyncio
import os
import shutil
import signal

import test_emit
import test_workers
from broker_node import free_port
from harness import HERE, SOURCE_DIR, RouterTestCase
from test_emit import derived_id
from test_workers import metric, read_jsonl

PYTHON = "/usr/bin/python3"
NODE = shutil.which("node") or "/usr/bin/node"
WORKERS = os.path.join(HERE, "workers")
PY_WORKER = os.path.join(WORKERS, "py_worker.py")
NODE_WORKER = os.path.join(WORKERS, "node_worker.js")
PY_CLIENT = os.path.join(SOURCE_DIR, "clients", "python")
NODE_CLIENT = os.path.join(SOURCE_DIR, "clients", "node")
RAG_WORKER = os.path.join(SOURCE_DIR, "config", "handlers", "rag_worker.py")
HANDLER = "w"
# Two retry steps: 100 and 400 ms.
RETRY = {"max_attempts": 3, "delay": "100ms", "multiplier": 4, "max_delay": "400ms"}


def phases(rec, **match):
    return [r for r in read_jsonl(rec) if all(r.get(k) == v for k, v in match.items())]


class WorkerClientCases:
    """The tests; a subclass says how to run its language's worker, with
    worker_argv(script) (the handler's `worker:` list) and worker_env()."""

    SCRIPT = None          # the worker script (its path shows in /proc/PID/cmdline)
    EMIT_STYLE = "snake"
    ERROR = None           # how the helper names a plain exception in the detail

    # The patterns of test_workers.py and test_emit.py.
    wait_for = test_workers.WorkersTest.wait_for
    acks = test_workers.WorkersTest.acks
    assert_all_acked_once = test_workers.WorkersTest.assert_all_acked_once
    get = test_workers.WorkersTest.get
    bind_follow = test_emit.EmitTest.bind_follow
    assert_follow_up = test_emit.EmitTest.assert_follow_up

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.addCleanup(self.kill_leftover_workers)  # runs before the harness's cleanup
        self.follow = self.queue_name("follow")  # bound by the test, not consumed by the daemon

    def kill_leftover_workers(self):
        """Workers of a daemon killed mid-test: one busy in a handler would not
        exit on end of input."""
        for d in self._daemons:
            d.kill()
        for path in self._record_files:
            for r in read_jsonl(path):
                if "pid" not in r:  # the guide's handler records
                    continue
                try:
                    with open("/proc/%d/cmdline" % r["pid"], "rb") as f:
                        if self.SCRIPT.encode() in f.read():
                            os.kill(r["pid"], signal.SIGKILL)
                except (OSError, ValueError):
                    pass

    def worker(self, name=HANDLER, events=("job.#",), **extra):
        rec = self.record_file(name)
        h = {"name": name, "events": list(events), "worker": self.worker_argv(self.SCRIPT),
             "env": dict(self.worker_env(), RECORD_FILE=rec), "timeout": "10s",
             "restart": {"initial": "100ms", "max": "1s"}}
        h.update(extra)
        return h, rec

    async def start(self, handlers, bindings=("job.#",), retry=RETRY, extra_queues=()):
        self.q = self.queue_name("work")
        self.dlq = self.q + ".dlq"
        self.http_port = free_port()
        self.cfg = self.config([{"name": self.q, "bindings": list(bindings), "prefetch": 10, "retry": retry,
                                 "handlers": handlers}, *extra_queues],
                               http={"listen": "127.0.0.1:%d" % self.http_port})
        self.cfg_path = self.write_config(self.cfg)
        self.daemon = await self.start_daemon(self.cfg_path)
        return self.daemon

    def booted(self, rec):
        return [r["pid"] for r in phases(rec, phase="boot")]

    def attempts(self, rec, ev, phase="start"):
        return [r["attempt"] for r in phases(rec, phase=phase, event_id=ev["event_id"])]

    # -- verdicts ------------------------------------------------------------------

    async def test_every_verdict(self):
        h, rec = self.worker()
        await self.start([h])
        ack = self.make_event("job.ack", {"attempts": ["ack"]})
        retry = self.make_event("job.retry", {"attempts": ["retry", "ack"], "retry_after_ms": 300,
                                              "reason": "db_down", "detail": "connection refused"})
        fail = self.make_event("job.fail", {"attempts": ["fail"], "message": "disk on fire"})
        dead = self.make_event("job.dead", {"attempts": ["dead_letter"], "reason": "bad_payload",
                                            "detail": "speaker_id missing"})
        for ev in (ack, retry, fail, dead):
            await self.publish(ev)
        dlq = await self.get_all(self.dlq, expect=2, timeout=30)
        by_id = {m.message_id: m for m in dlq}
        self.assertEqual(set(by_id), {dead["event_id"], fail["event_id"]})
        # DeadLetter(reason, detail): at once, with both.
        hd = by_id[dead["event_id"]].headers
        self.assertEqual(hd.get("x-death-reason"), "bad_payload", hd)
        self.assertEqual(hd.get("x-death-detail"), "speaker_id missing", hd)
        self.assertEqual(by_id[dead["event_id"]].json(), dead)
        self.assertEqual(self.attempts(rec, dead), [1])
        # A plain exception: retried (handler_failed) up to max_attempts, the exception in the detail.
        hd = by_id[fail["event_id"]].headers
        self.assertEqual(hd.get("x-death-reason"), "max_attempts", hd)
        self.assertEqual(int(hd.get("x-attempts")), 3, hd)
        self.assertEqual(hd.get("x-death-handler"), HANDLER, hd)
        self.assertEqual(hd.get("x-death-detail"),
                         "gave up after 3 attempts; last error: handler_failed: %s: disk on fire" % self.ERROR)
        self.assertEqual(self.attempts(rec, fail), [1, 2, 3])
        failed = self.daemon.records("handled", event_id=fail["event_id"], outcome="retry")
        self.assertEqual(len(failed), 3, self.daemon.tail())  # the third one gave up
        self.assertEqual({r.fields["detail"] for r in failed}, {"%s: disk on fire" % self.ERROR})
        # Retry(after=300ms): back through the delay queue (the 400 ms step) as attempt 2, no sooner.
        await self.assert_all_acked_once([ack, retry])
        self.assertEqual(self.attempts(rec, retry), [1, 2])
        [raised] = phases(rec, phase="done", event_id=retry["event_id"], attempt=1)
        [again] = phases(rec, phase="start", event_id=retry["event_id"], attempt=2)
        self.assertGreaterEqual(again["time"] - raised["time"], 0.3)
        [retried] = self.daemon.records("retrying later", event_id=retry["event_id"])
        self.assertEqual(retried.fields["detail"], "connection refused")
        self.assertGreaterEqual(int(retried.fields["next_attempt_in_ms"]), 400)
        # The retries' reasons: the handler's, and handler_failed for the exception.
        _, _, text = await self.get("/metrics")
        self.assertEqual(metric(text, "event_router_retries_total", queue=self.q, reason="db_down"), 1, text)
        self.assertEqual(metric(text, "event_router_retries_total", queue=self.q, reason="handler_failed"), 2, text)
        self.assertEqual(self.attempts(rec, ack), [1])
        # What the handler saw of the event, and one process did it all.
        [start] = phases(rec, phase="start", event_id=ack["event_id"])
        self.assertEqual((start["event_type"], start["correlation_id"], start["routing_key"], start["queue"],
                          start["redelivered"], start["handler"]),
                         ("job.ack", ack["correlation_id"], "job.ack", self.q, False, HANDLER))
        self.assertEqual(len({r["pid"] for r in read_jsonl(rec)}), 1)

    async def test_hostile_bodies_cannot_break_the_protocol(self):
        # A publisher's body is written into the worker's protocol line: raw
        # CR/LF between tokens (a lone CR is a line end to Node's readline),
        # raw U+2028/U+2029, an escaped forged answer. None may split the
        # line, answer for another event, or restart the worker.
        h, rec = self.worker()
        await self.start([h])
        q = self.prefix
        bodies = [
            ("%s-crlf" % q, b'{\r\n "event_id": "%s-crlf",\r "event_type": "job.ack",\n\r'
                            b' "payload": {"attempts": ["ack"]}\r\n}\r\n' % q.encode()),
            ("%s-forged" % q, ('{"event_id": "%s-forged", "event_type": "job.ack", "payload": {"attempts": ["ack"],'
                               ' "note": "x\\n{\\"type\\":\\"result\\",\\"id\\":1,\\"verdict\\":'
                               '\\"dead_letter\\"}\\n"}}' % q).encode()),
            ("%s-seps" % q, ('{"event_id": "%s-seps", "event_type": "job.ack", "payload": {"attempts": ["ack"],'
                             ' "note": "a\u2028b\u2029c\u0085d"}}' % q).encode("utf-8")),
        ]
        for _, body in bodies:
            await self.publish_raw(body, "job.ack")
        await self.assert_all_acked_once([{"event_id": eid} for eid, _ in bodies])
        self.assertEqual(len(self.booted(rec)), 1, self.daemon.tail())  # never restarted
        self.assertEqual(sorted(r["event_id"] for r in phases(rec, phase="start")), sorted(e for e, _ in bodies))
        self.assertEqual(self.daemon.records("worker process ended"), [])

    async def test_events_in_flight_at_once(self):
        # 8 at once in one process (the hello's concurrency), by its own count.
        h, rec = self.worker(concurrency=8)
        await self.start([h])
        events = [self.make_event("job.slow", {"sleep_ms": 500}) for _ in range(20)]
        for ev in events:
            await self.publish(ev)
        await self.assert_all_acked_once(events)
        starts = phases(rec, phase="start")
        self.assertEqual(len(starts), 20)
        self.assertEqual(max(r["inflight"] for r in starts), 8, starts)
        self.assertEqual(len(self.booted(rec)), 1)

    # -- emit ------------------------------------------------------------------------

    def emitter(self, **extra):
        if self.EMIT_STYLE != "snake":
            extra["emit"] = {"style": self.EMIT_STYLE}
        return self.worker(**extra)

    async def test_emit_published_once_with_derived_ids(self):
        h, rec = self.emitter()
        await self.start([h])
        await self.bind_follow()
        ev = self.make_event("job.created", {"emit": [
            {"event_type": "follow.created", "aggregate_id": "d-1", "aggregate_type": "Draft",
             "payload": {"dfn": "x", "n": [1, 2]}},
            {"event_type": "follow.other", "routing_key": "follow.custom.key"},
        ]})
        await self.publish(ev)
        got = await self.get_all(self.follow, expect=2)
        await self.assert_all_acked_once([ev])
        by_type = {m.type: m for m in got}
        self.assertEqual(set(by_type), {"follow.created", "follow.other"})
        style = self.EMIT_STYLE
        first = self.assert_follow_up(by_type["follow.created"], ev, 0, "follow.created", style=style,
                                      handler=HANDLER)
        self.assertEqual(first["payload"], {"dfn": "x", "n": [1, 2]})
        agg = ("aggregateId", "aggregateType") if style == "camel" else ("aggregate_id", "aggregate_type")
        self.assertEqual((first[agg[0]], first[agg[1]]), ("d-1", "Draft"))
        if style == "camel":
            self.assertFalse({"event_id", "event_type", "correlation_id", "causation_id"} & set(first), first)
        second = self.assert_follow_up(by_type["follow.other"], ev, 1, "follow.other", key="follow.custom.key",
                                       style=style, handler=HANDLER)
        self.assertEqual(second["payload"], {})
        # Once: nothing more arrives.
        await asyncio.sleep(0.5)
        self.assertEqual(await self.get_all(self.follow), [])
        self.assertEqual(self.attempts(rec, ev), [1])

    async def test_retried_handler_emits_the_same_id_once(self):
        # Attempt 1 emits, then raises: nothing goes out. Attempt 2 emits the
        # same and returns: one follow-up, with the id derived from the trigger.
        h, rec = self.emitter()
        await self.start([h])
        await self.bind_follow()
        emits = [{"event_type": "follow.created", "payload": {"n": 1}}]
        ev = self.make_event("job.created", {"attempts": ["fail", "ack"], "emit": emits})
        await self.publish(ev)
        [m] = await self.get_all(self.follow, expect=1)
        await self.assert_all_acked_once([ev])
        self.assertEqual([(r["attempt"], r["action"]) for r in phases(rec, phase="done", event_id=ev["event_id"])],
                         [(1, "fail"), (2, "ack")])
        self.assert_follow_up(m, ev, 0, "follow.created", style=self.EMIT_STYLE, handler=HANDLER)
        await asyncio.sleep(0.5)
        self.assertEqual(await self.get_all(self.follow), [], "the failed attempt's emit was published")
        # A second run of the same trigger (published again, acked at once) emits the same id.
        again = dict(ev, payload={"emit": emits})
        await self.publish(again)
        [m2] = await self.get_all(self.follow, expect=1)
        self.assertEqual(m2.message_id, m.message_id)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(len(self.acks(ev["event_id"])), 2)  # two runs, each acked once
        self.assertEqual(await self.message_count(self.dlq), 0)

    async def test_unroutable_emit_dead_letters_the_original(self):
        h, rec = self.emitter()
        await self.start([h])
        await self.bind_follow()
        ev = self.make_event("job.created", {"emit": [{"event_type": "follow.created"},
                                                      {"event_type": "nobody.listens", "payload": {"a": 1}}]})
        await self.publish(ev)
        [dead] = await self.get_all(self.dlq, expect=1, timeout=30)
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertEqual(dead.message_id, ev["event_id"])
        self.assertEqual(dead.headers.get("x-death-reason"), "emit_unroutable", dead.headers)
        self.assertIn("emit[1] (nobody.listens, id %s)" % derived_id(ev["event_id"], HANDLER, 1),
                      dead.headers.get("x-death-detail"))
        # The handler's ack became a dead letter once the broker returned the
        # emit: the event was settled that way, once, and not handled again.
        [r] = self.daemon.records("dead-lettering", event_id=ev["event_id"])
        self.assertEqual(r.fields["reason"], "emit_unroutable")
        self.assertEqual(len(self.acks(ev["event_id"])), 1)  # the handler's verdict
        self.assertEqual(self.attempts(rec, ev), [1])
        # The routable emit went out (a `dlq replay` sends it again with the same id).
        [m] = await self.get_all(self.follow, expect=1)
        self.assert_follow_up(m, ev, 0, "follow.created", style=self.EMIT_STYLE, handler=HANDLER)
        await asyncio.sleep(0.5)
        self.assertEqual(await self.message_count(self.dlq), 0)  # taken above: no second copy
        self.assertTrue(self.daemon.running())

    # -- misbehaving user code -------------------------------------------------------

    async def misbehave(self, action, reason, detail_re, **extra):
        """One bad event among good ones in one process: every event acked
        once, the bad one's attempt 2 in a new process, the daemon up."""
        h, rec = self.worker(concurrency=4, **extra)
        await self.start([h])
        [first_pid] = self.booted(rec)
        bad = self.make_event("job.bad", {"attempts": [action, "ack"], "sleep_ms": 300})
        good = [self.make_event("job.good", {"sleep_ms": 600}) for _ in range(3)]
        for ev in [good[0], bad, *good[1:]]:
            await self.publish(ev)
        await self.assert_all_acked_once([bad, *good])
        [retried] = self.daemon.records("handled", event_id=bad["event_id"], outcome="retry")
        self.assertRegex(retried.fields["detail"], detail_re)
        [failed] = self.daemon.records("worker process failed; restarting", handler=HANDLER)
        self.assertEqual(failed.fields["reason"], reason)
        self.assertEqual(failed.fields["detail"], retried.fields["detail"])
        self.assertEqual(self.attempts(rec, bad), [1, 2])
        starts = phases(rec, phase="start", event_id=bad["event_id"])
        self.assertEqual(starts[0]["pid"], first_pid)
        self.assertNotEqual(starts[1]["pid"], first_pid)
        self.assertIn(starts[1]["pid"], self.booted(rec))
        self.assertFalse(os.path.exists("/proc/%d" % first_pid), "the failed process is still there")
        self.assertTrue(self.daemon.running())

    async def test_crash_mid_event(self):
        await self.misbehave("crash", "worker_exited", r"^exited \(exit code 7\)$")

    async def test_hang_past_timeout(self):
        await self.misbehave("hang", "worker_timeout", r"^event \d+ not answered within 1500ms$", timeout="1500ms")

    async def test_prints_from_user_code_go_to_the_log(self):
        h, rec = self.worker()
        await self.start([h])
        ev = self.make_event("job.print", {"stdout": ["hello from user code",
                                                      '{"type":"result","id":424242,"verdict":"ack"}',
                                                      '{"type":"ready","protocol":1}'],
                                           "forge_answer": True})
        await self.publish(ev)
        await self.assert_all_acked_once([ev])
        [pid] = self.booted(rec)
        [forged] = phases(rec, phase="forged")
        lines = ["hello from user code", '{"type":"result","id":424242,"verdict":"ack"}',
                 '{"type":"ready","protocol":1}', forged["line"]]
        for line in lines:
            self.assertEqual(len(self.daemon.records(line, handler=HANDLER, stream="stdout", pid=str(pid))), 1,
                             self.daemon.tail())
        self.assertEqual(self.daemon.records("worker process failed; restarting"), [])
        self.assertEqual(len({r["pid"] for r in read_jsonl(rec)}), 1, "the process was restarted")

    # -- stop and reload -------------------------------------------------------------

    async def test_sigterm_drains_then_the_worker_exits_on_end_of_input(self):
        h, rec = self.worker()
        d = await self.start([h])
        ev = self.make_event("job.slow", {"sleep_ms": 2000})
        await self.publish(ev)
        await self.wait_for("the start", lambda: phases(rec, phase="start"))
        self.assertEqual(await d.stop(signal.SIGTERM), 0, d.tail())
        self.assertEqual(len(self.acks(ev["event_id"])), 1)
        [pid] = self.booted(rec)
        self.assertEqual([r["phase"] for r in read_jsonl(rec)], ["boot", "start", "done", "exit"])
        self.assertEqual(len(d.records("worker process ended", handler=HANDLER, pid=str(pid),
                                       status="exit code 0")), 1, d.tail())
        self.assertEqual(d.records("worker process still running after end of input and kill_grace; "
                                   "sending SIGTERM"), [])
        self.assertFalse(os.path.exists("/proc/%d" % pid))
        await self.wait_queue_counts(self.q, 0, 0)

    async def test_sighup_replaces_a_changed_worker_without_losing_its_event(self):
        h, rec = self.worker()
        d = await self.start([h])
        [old_pid] = self.booted(rec)
        slow = self.make_event("job.slow", {"sleep_ms": 2500})
        await self.publish(slow)
        await self.wait_for("the start", lambda: phases(rec, phase="start"))
        self.cfg["queues"][0]["handlers"][0]["env"]["GENERATION"] = "2"
        self.write_config(self.cfg)
        d.send_signal(signal.SIGHUP)
        await d.wait_for_record("reloaded")
        after = [self.make_event("job.after", {}) for _ in range(3)]
        for ev in after:
            await self.publish(ev)
        await self.assert_all_acked_once([slow, *after])
        [new] = [r for r in phases(rec, phase="boot") if r["pid"] != old_pid]
        self.assertEqual(new["generation"], "2")
        by_event = {r["event_id"]: r["pid"] for r in phases(rec, phase="start")}
        self.assertEqual(by_event[slow["event_id"]], old_pid)
        for ev in after:
            self.assertEqual(by_event[ev["event_id"]], new["pid"])
        # The old process finished its event, got end of input and exited.
        await self.wait_for("the old worker's exit", lambda: phases(rec, phase="exit", pid=old_pid))
        self.assertEqual([r["phase"] for r in phases(rec, pid=old_pid)], ["boot", "start", "done", "exit"])
        self.assertEqual(await d.stop(), 0)


class PythonWorkerClientTest(WorkerClientCases, RouterTestCase):
    SCRIPT = PY_WORKER
    ERROR = "RuntimeError"

    def worker_argv(self, script):
        return [PYTHON, script]

    def worker_env(self):
        return {"PYTHONPATH": PY_CLIENT}

    async def test_shipped_rag_worker_and_guide_handlers(self):
        # config/handlers/rag_worker.py (rag.dfn_generated: emits evaluation.started;
        # no dfn_id: dead_letter bad_payload; other rag.*: ack), run as config/router.yaml
        # runs it (the script as the program, no PYTHONPATH: it finds the helper next
        # to it in a source tree), and the guide's idempotent handler
        # (clients/python/tests/workers), with events published as the Python
        # services publish them (aio-pika, snake_case).
        rag = {"name": "rag-worker", "events": ["rag.*"], "worker": [RAG_WORKER], "timeout": "10s"}
        guide_rec = self.record_file("guide")
        guide = {"name": "speaker-worker", "events": ["speaker.*"],
                 "worker": [PYTHON, os.path.join(PY_CLIENT, "tests", "workers", "guide_idempotent.py")],
                 "env": {"PYTHONPATH": PY_CLIENT, "RECORD_FILE": guide_rec}, "timeout": "10s"}
        speakers = self.queue_name("speakers")
        await self.start([rag], bindings=["rag.*"], extra_queues=[
            {"name": speakers, "bindings": ["speaker.*"], "retry": RETRY, "handlers": [guide]}])
        await self.bind_follow(key="evaluation.*")
        ok = self.make_event("rag.dfn_generated", {"dfn_id": "dfn-1", "draft_id": "draft-1"})
        bad = self.make_event("rag.dfn_generated", {"draft_id": "draft-2"})
        other = self.make_event("rag.reindexed", {})
        flaky = self.make_event("speaker.onboarded", {"speaker_id": "flaky-7", "name": "John Doe"})
        dup = self.make_event("speaker.onboarded", {"speaker_id": "flaky-7", "name": "John Doe"})
        for ev in (ok, bad, other, flaky):
            await self.publish(ev)
        [m] = await self.get_all(self.follow, expect=1)
        body = self.assert_follow_up(m, ok, 0, "evaluation.started", handler="rag-worker")
        self.assertEqual(body["payload"], {"evaluation_id": "eval-dfn-1", "dfn_id": "dfn-1"})
        self.assertEqual((body["aggregate_id"], body["aggregate_type"]), ("eval-dfn-1", "Evaluation"))
        [dead] = await self.get_all(self.dlq, expect=1)
        self.assertEqual(dead.message_id, bad["event_id"])
        self.assertEqual(dead.headers.get("x-death-reason"), "bad_payload", dead.headers)
        self.assertIn("payload.dfn_id", dead.headers.get("x-death-detail"))
        await self.assert_all_acked_once([ok, other])
        out = [r.msg for r in self.daemon.records(handler="rag-worker", stream="stdout")]
        self.assertEqual(sorted(out), sorted(["DFN generated: dfn_id='dfn-1' draft_id='draft-1' attempt=1",
                                              "rag event 'rag.reindexed': nothing to do"]))
        # The guide's handler: raised (database down) -> retried, processed on attempt 2;
        # the same speaker again -> "Event already processed".
        await self.wait_for("processed", lambda: [r for r in read_jsonl(guide_rec) if r.get("processed")])
        await self.publish(dup)
        await self.wait_for("the duplicate", lambda: [r for r in read_jsonl(guide_rec) if r.get("log") == "info"])
        self.assertEqual(read_jsonl(guide_rec), [
            {"processed": "flaky-7"},
            {"log": "info", "msg": "Event already processed", "speaker_id": "flaky-7"}])
        [retried] = self.daemon.records("handled", event_id=flaky["event_id"], outcome="retry")
        self.assertIn("ConnectionError: database unavailable", retried.fields["detail"])
        self.q = speakers
        self.dlq = speakers + ".dlq"
        await self.assert_all_acked_once([flaky, dup])


class NodeWorkerClientTest(WorkerClientCases, RouterTestCase):
    SCRIPT = NODE_WORKER
    EMIT_STYLE = "camel"
    ERROR = "Error"

    def worker_argv(self, script):
        return [NODE, script]

    def worker_env(self):
        # A folder where require('@event-router/worker') finds <source>/clients/node.
        modules = os.path.join(self.tmp, "node_path")
        link = os.path.join(modules, "@event-router", "worker")
        if not os.path.islink(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(NODE_CLIENT, link)
        return {"NODE_PATH": modules}

    async def test_guide_handler_with_an_amqplib_event(self):
        # The guide's "Consuming Events" handler, copied verbatim
        # (clients/node/fixtures/workers/guide_consuming.js), and events as the
        # TypeScript services publish them (amqplib, camelCase).
        guide = {"name": "speaker-worker", "events": ["speaker.*"],
                 "worker": [NODE, os.path.join(NODE_CLIENT, "fixtures", "workers", "guide_consuming.js")],
                 "timeout": "10s"}
        await self.start([guide], bindings=["speaker.*"])
        ok = self.make_camel_event("speaker.onboarded", {"speaker_id": "123", "external_id": "ext-123",
                                                         "name": "John Doe", "bucket": "GOOD"})
        broken = self.make_camel_event("speaker.onboarded")
        del broken["payload"]
        await self.publish_camel([ok, broken])
        # No payload: the handler throws a TypeError -> retried, then dead-lettered.
        [dead] = await self.get_all(self.dlq, expect=1, timeout=30)
        self.assertEqual(dead.message_id, broken["eventId"])
        self.assertEqual(dead.headers.get("x-death-reason"), "max_attempts", dead.headers)
        self.assertIn("TypeError: Cannot read properties of undefined (reading 'speaker_id')",
                      dead.headers.get("x-death-detail"))
        self.assertEqual(len(self.daemon.records("handled", event_id=broken["eventId"], outcome="retry")), 3)
        await self.assert_all_acked_once([{"event_id": ok["eventId"]}])
        [line] = self.daemon.records("Speaker onboarded: 123", handler="speaker-worker", stream="stdout")
        [ack] = self.acks(ok["eventId"])
        self.assertEqual((ack.fields["event_type"], ack.fields["correlation_id"]),
                         ("speaker.onboarded", ok["correlationId"]))


if __name__ == "__main__":
    import unittest
    unittest.main()
