"""The helper against the daemon's side of docs/worker-protocol.md, played by
the test over real pipes to a real worker process."""
import os
import signal
import unittest

from workerproc import WorkerTestCase


class HandshakeTest(WorkerTestCase):
    def test_ready_on_fd_4_then_events(self):
        w = self.start()
        self.assertEqual(w.hello(concurrency=4), {"type": "ready", "protocol": 1})
        w.event(1, "ack.one")
        self.assertEqual(w.results(1), {1: {"type": "result", "id": 1, "verdict": "ack"}})
        w.close_input()
        self.assertEqual(w.wait(), 0)
        self.assertEqual(w.stdout(), "")  # nothing of the protocol on stdout

    def test_version_mismatch_answers_1_and_exits_non_zero(self):
        w = self.start()
        self.assertEqual(w.hello(protocol=2), {"type": "ready", "protocol": 1})
        self.assertIsNone(w.read())  # fd 4 closed
        self.assertEqual(w.wait(), 2)
        self.assertIn("the daemon speaks worker protocol 2, this helper (clients/python) speaks 1", w.stderr())

    def test_first_message_not_a_hello(self):
        w = self.start()
        w.event(1, "ack.one")
        self.assertIsNone(w.read())
        self.assertEqual(w.wait(), 2)
        self.assertIn("expected a hello as the first message", w.stderr())

    def test_without_protocol_fds_explains_and_exits(self):
        import subprocess
        from workerproc import CLIENT_DIR, PYTHON, WORKERS
        p = subprocess.run([PYTHON, os.path.join(WORKERS, "fixture.py")], capture_output=True, text=True,
                           env={"PYTHONPATH": CLIENT_DIR, "RECORD_FILE": self.records.path}, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn("reads events on fd 3 and answers on fd 4", p.stderr)

    def test_fds_from_the_environment(self):
        import subprocess
        from workerproc import CLIENT_DIR, PYTHON, WORKERS
        ev_r, ev_w = os.pipe()
        res_r, res_w = os.pipe()
        env = {"PYTHONPATH": CLIENT_DIR, "RECORD_FILE": self.records.path,
               "ER_WORKER_IN_FD": str(ev_r), "ER_WORKER_OUT_FD": str(res_w)}
        p = subprocess.Popen([PYTHON, os.path.join(WORKERS, "fixture.py")], env=env, pass_fds=(ev_r, res_w))
        os.close(ev_r)
        os.close(res_w)
        with os.fdopen(ev_w, "wb") as to_worker, os.fdopen(res_r, "rb") as from_worker:
            to_worker.write(b'{"type":"hello","protocol":1,"concurrency":1}\n'
                            b'{"type":"event","id":5,"event_type":"ack.x","event":{"event_id":"e"}}\n')
            to_worker.close()
            self.assertEqual(from_worker.read(), b'{"type":"ready","protocol":1}\n'
                                                 b'{"type":"result","id":5,"verdict":"ack"}\n')
        self.assertEqual(p.wait(30), 0)

    def test_programs_the_handlers_start_do_not_get_the_protocol_fds(self):
        w = self.started()
        w.event(1, "child.fds")
        self.assertEqual(w.results(1)[1]["verdict"], "ack")
        rec, = self.records.wait(lambda r: r["phase"] == "child", 1)
        self.assertIn(2, rec["fds"])  # the listing worked
        self.assertNotIn(3, rec["fds"])
        self.assertNotIn(4, rec["fds"])

    def test_garbage_and_unknown_messages_from_the_daemon_are_skipped(self):
        w = self.started()
        w.send(b"not json\n\n[1,2]\n")
        w.send({"type": "ping", "future": True})
        w.event(1, "ack.one")
        self.assertEqual(w.results(1)[1]["verdict"], "ack")
        w.wait_stderr("ignored a line that is not JSON")
        w.wait_stderr("ignored messages of type 'ping'")


class VerdictTest(WorkerTestCase):
    def test_every_verdict(self):
        w = self.started()
        w.event(1, "ack.x")
        w.event(2, "retry.after", {"seconds": 2.5, "reason": "db_down", "detail": "connection refused"})
        w.event(3, "retry.after", {"seconds": 0.0001})
        w.event(4, "retry.timedelta", {"ms": 250})
        w.event(5, "retry.bare")
        w.event(6, "dead.x", {"reason": "bad_payload", "detail": "speaker_id missing"})
        w.event(7, "dead.x", {"reason": None})
        w.event(8, "fail.value", {"message": "no such speaker"})
        w.event(9, "nobody.home")
        r = w.results(9)
        self.assertEqual(r[1], {"type": "result", "id": 1, "verdict": "ack"})
        self.assertEqual(r[2], {"type": "result", "id": 2, "verdict": "retry", "delay_ms": 2500,
                                "reason": "db_down", "detail": "connection refused"})
        self.assertEqual(r[3]["delay_ms"], 1)  # rounded up: `after` is the least wait
        self.assertEqual(r[4], {"type": "result", "id": 4, "verdict": "retry", "delay_ms": 60250, "reason": "later"})
        self.assertEqual(r[5], {"type": "result", "id": 5, "verdict": "retry", "reason": "handler_failed"})
        self.assertEqual(r[6], {"type": "result", "id": 6, "verdict": "dead_letter", "reason": "bad_payload",
                                "detail": "speaker_id missing"})
        self.assertEqual(r[7], {"type": "result", "id": 7, "verdict": "dead_letter", "reason": "handler_rejected"})
        self.assertEqual(r[8], {"type": "result", "id": 8, "verdict": "retry", "reason": "handler_failed",
                                "detail": "ValueError: no such speaker"})
        self.assertEqual(r[9], {"type": "result", "id": 9, "verdict": "dead_letter", "reason": "no_handler",
                                "detail": "no handler for event type 'nobody.home'"})
        # The unexpected exception's traceback went to stderr (the daemon's log).
        w.wait_stderr("handler fail_value failed on event 'ev-8'")
        w.wait_stderr('raise ValueError(payload(event_data)["message"])')

    def test_reason_and_detail_are_made_valid(self):
        w = self.started()
        w.event(1, "dead.x", {"reason": "bad payload/é" + "x" * 100, "detail": "é" * 2000})
        w.event(2, "fail.value", {"message": "\u2028" * 1000})
        r = w.results(2)
        self.assertEqual(r[1]["reason"], "bad_payload__" + "x" * 51)
        self.assertEqual(len(r[1]["detail"].encode()), 1024)
        self.assertEqual(r[1]["detail"], "é" * 512)
        self.assertEqual(len(r[2]["detail"].encode()), 1023)  # 12 + 337 * 3: no character cut in half
        self.assertTrue(r[2]["detail"].startswith("ValueError: \u2028"))

    def test_verdict_exceptions_half_built_still_answer(self):
        r = self.started().handle("retry.subclass", "retry.mutated", "dead.subclass")
        self.assertEqual(r[1], {"type": "result", "id": 1, "verdict": "retry", "reason": "handler_failed"})
        self.assertEqual(r[2], {"type": "result", "id": 2, "verdict": "retry", "reason": "bad_reason_",
                                "detail": "???"})
        self.assertEqual(r[3], {"type": "result", "id": 3, "verdict": "dead_letter", "reason": "handler_rejected"})

    def test_exception_whose_str_fails(self):
        w = self.started()
        w.event(1, "fail.unprintable")
        self.assertEqual(w.results(1)[1], {"type": "result", "id": 1, "verdict": "retry", "reason": "handler_failed",
                                           "detail": "Unprintable: <str() raised RuntimeError>"})
        w.event(2, "ack.after")  # the worker carries on
        self.assertEqual(w.results(1)[2]["verdict"], "ack")

    def test_sys_exit_in_a_handler_retries_that_event_only(self):
        w = self.started()
        w.event(1, "sleep.x", {"seconds": 0.3})
        w.event(2, "fail.exit")
        r = w.results(2)
        self.assertEqual(r[2]["detail"], "SystemExit: 3")
        self.assertEqual(r[1]["verdict"], "ack")
        self.assertIsNone(w.proc.poll())

    def test_plain_functions_run_in_threads(self):
        r = self.started().handle("sync.ack", "sync.fail", "sync.dead")
        self.assertEqual(r[1]["verdict"], "ack")
        self.assertEqual((r[2]["verdict"], r[2]["reason"], r[2]["detail"]), ("retry", "handler_failed", "KeyError: 'missing'"))
        self.assertEqual((r[3]["verdict"], r[3]["reason"]), ("dead_letter", "sync_rejected"))
        rec, = self.records.wait(lambda r: r["phase"] == "sync", 1)
        self.assertEqual(rec["id"], 1)  # current() works in the thread too
        self.assertFalse(rec["thread_is_main"])
        self.assertTrue(rec["thread"].startswith("event_router"))

    def test_metadata_through_current(self):
        w = self.started()
        body = w.event(7, "meta.x", {"k": [1, 2]}, attempt=3)
        self.assertEqual(w.results(1)[7]["verdict"], "ack")
        rec, = self.records.wait(lambda r: r["phase"] == "meta", 1)
        self.assertEqual(rec["event"], body)  # the handler gets the event as published
        self.assertEqual(rec["context"], {
            "id": 7, "handler": "test-worker", "event_type": "meta.x", "event_id": "ev-7", "aggregate_id": "agg-7",
            "aggregate_type": "Test", "correlation_id": "corr-7", "routing_key": "meta.x",
            "exchange": "test.exchange", "queue": "test.events", "attempt": 3, "redelivered": True})


class ConcurrencyTest(WorkerTestCase):
    def test_async_handlers_all_in_flight_at_once(self):
        n = 12
        w = self.started(concurrency=n)
        for i in range(1, n + 1):
            w.event(i, "wait.async", {"n": n})
        r = w.results(n)  # each waits until all n have started: only concurrency can answer
        self.assertEqual({m["verdict"] for m in r.values()}, {"ack"})
        recs = self.records.all()
        starts = [x for x in recs if x["phase"] == "start"]
        first_end = min(x["time"] for x in recs if x["phase"] == "end")
        self.assertEqual(len(starts), n)
        self.assertTrue(all(s["time"] <= first_end for s in starts))
        self.assertEqual(max(s["in_flight"] for s in starts), n)
        self.assertEqual({s["thread"] for s in starts}, {"MainThread"})  # one loop

    def test_plain_handlers_in_flight_at_once(self):
        n = 6
        w = self.started(concurrency=n)
        for i in range(1, n + 1):
            w.event(i, "wait.sync", {"n": n})
        self.assertEqual({m["verdict"] for m in w.results(n).values()}, {"ack"})
        self.assertEqual(len({x["thread"] for x in self.records.all() if x["phase"] == "start"}), n)

    def test_never_more_than_the_hello_concurrency(self):
        # A daemon that sends too many: the helper still holds to the limit and answers all.
        w = self.started(concurrency=3)
        for i in range(1, 11):
            w.event(i, "sleep.x", {"seconds": 0.05})
        self.assertEqual(len(w.results(10)), 10)
        self.assertEqual(max(x["in_flight"] for x in self.records.all() if x["phase"] == "start"), 3)

    def test_context_variables_do_not_leak_between_events(self):
        w = self.started(concurrency=4)
        for i in range(1, 5):
            w.event(i, "ctxvar.x")
        w.results(4)
        w.event(5, "ctxvar.x")
        w.results(1)
        recs = self.records.wait(lambda r: r["phase"] == "ctxvar", 5)
        self.assertEqual({r["id"]: (r["seen"], r["after"]) for r in recs},
                         {i: (None, "ev-%d" % i) for i in range(1, 6)})


class EmitTest(WorkerTestCase):
    def test_emits_go_with_the_ack(self):
        w = self.started()
        w.event(1, "emit.full")
        self.assertEqual(w.results(1)[1], {"type": "result", "id": 1, "verdict": "ack", "emit": [
            {"event_type": "rag.dfn_generated", "payload": {"dfn": "é\u2028\n"}, "aggregate_id": "d-1",
             "aggregate_type": "Draft", "routing_key": "rag.custom"},
            {"event_type": "rag.empty", "payload": {}}]})
        self.assertNotIn(b"\n", w.lines[-1])  # the raw newline in the payload is escaped

    def test_concurrent_events_emits_never_mix(self):
        w = self.started(concurrency=10)
        for i in range(1, 11):
            w.event(i, "emit.interleave", {"tag": "t%d" % i, "count": 5})
        r = w.results(10)
        for i in range(1, 11):
            self.assertEqual(r[i]["verdict"], "ack")
            self.assertEqual(r[i]["emit"], [{"event_type": "follow.up", "payload": {"tag": "t%d" % i, "i": k},
                                            "aggregate_id": "t%d" % i} for k in range(5)])

    def test_emits_from_tasks_the_handler_starts_and_from_threads(self):
        w = self.started()
        w.event(1, "emit.subtask", {"tag": "a"})
        w.event(2, "emit.subtask", {"tag": "b"})
        w.event(3, "emit.sync", {"tag": "c"})
        r = w.results(3)
        for id, tag in ((1, "a"), (2, "b")):
            self.assertEqual(sorted(e["payload"]["i"] for e in r[id]["emit"]), [0, 1, 2])
            self.assertEqual({e["payload"]["tag"] for e in r[id]["emit"]}, {tag})
        self.assertEqual(r[3]["emit"], [{"event_type": "follow.sync", "payload": {"tag": "c"}}])

    def test_emits_are_dropped_with_another_verdict(self):
        w = self.started()
        w.event(1, "emit.interleave", {"tag": "t", "count": 2, "retry": True})
        self.assertEqual(w.results(1)[1], {"type": "result", "id": 1, "verdict": "retry", "delay_ms": 1000,
                                           "reason": "handler_failed"})

    def test_bad_emits_fail_the_handler(self):
        w = self.started()
        for i, kind in enumerate(["list", "nan", "surrogate", "object"], 1):
            w.event(i, "emit.bad", {"kind": kind})
        r = w.results(4)
        self.assertTrue(r[1]["detail"].startswith("TypeError: emit(): payload must be a dict"))
        self.assertEqual(r[2]["detail"], "ValueError: Out of range float values are not JSON compliant")
        self.assertTrue(r[3]["detail"].startswith("ValueError: emit(): the event holds a lone surrogate"))
        self.assertEqual(r[4]["detail"], "TypeError: Object of type object is not JSON serializable")
        self.assertEqual({m["reason"] for m in r.values()}, {"handler_failed"})

    def test_large_and_too_large_answers(self):
        w = self.started()
        w.event(1, "emit.big", {"bytes": 4 << 20})
        w.event(2, "emit.big", {"bytes": 17 << 20})
        w.event(3, "ack.after")
        r = w.results(3, timeout=60)
        self.assertEqual(len(r[1]["emit"][0]["payload"]["blob"]), 4 << 20)
        self.assertEqual((r[2]["verdict"], r[2]["reason"]), ("dead_letter", "emit_too_large"))
        self.assertEqual(r[3]["verdict"], "ack")

    def test_emit_after_the_answer_is_refused(self):
        w = self.started()
        w.event(1, "emit.late")
        self.assertEqual(w.results(1)[1], {"type": "result", "id": 1, "verdict": "ack"})
        rec, = self.records.wait(lambda r: r["phase"] == "late", 1)
        self.assertEqual(rec["error"], "event_router.emit(): event 1 is already answered")


class OutputSafetyTest(WorkerTestCase):
    def test_print_in_a_handler_does_not_touch_the_protocol(self):
        w = self.started()
        w.event(1, "print.x")
        w.event(2, "ack.y")
        self.assertEqual(w.results(2), {1: {"type": "result", "id": 1, "verdict": "ack"},
                                        2: {"type": "result", "id": 2, "verdict": "ack"}})
        self.records.wait(lambda r: r["phase"] == "printed", 1)
        w.close_input()
        self.assertEqual(w.wait(), 0)
        self.assertIsNone(w.read())  # nothing else came on fd 4
        out = w.stdout()
        self.assertIn('{"type":"result","id":1,"verdict":"dead_letter"}\nplain text from the handler\n'
                      "no newline at the end", out)
        self.assertIn("raw write to fd 1\n", out)
        self.assertIn("x" * 200000, out)
        self.assertIn("to stderr", w.stderr())


class EndTest(WorkerTestCase):
    def test_end_of_input_finishes_in_flight_events_then_exits_0(self):
        w = self.started(concurrency=2)
        for i in range(1, 6):  # more than the concurrency: the rest waits in the pipe
            w.event(i, "sleep.x", {"seconds": 0.2})
        w.close_input()
        r = w.results(5)
        self.assertEqual({m["verdict"] for m in r.values()}, {"ack"})
        self.assertIsNone(w.read())
        self.assertEqual(w.wait(), 0)
        self.assertEqual(len([x for x in self.records.all() if x["phase"] == "end"]), 5)

    def test_sigterm_finishes_in_flight_takes_nothing_new_exits_0(self):
        w = self.started(concurrency=3)
        for i in range(1, 4):  # long enough to be in flight when the signal comes
            w.event(i, "sleep.x", {"seconds": 2})
        self.records.wait(lambda r: r["phase"] == "start", 3)
        os.kill(w.proc.pid, signal.SIGTERM)
        w.wait_stderr("SIGTERM: finishing 3 event(s) in flight")
        w.event(4, "ack.late")  # after SIGTERM: not taken (the daemon retries it)
        r = w.results(3)
        self.assertEqual(sorted(r), [1, 2, 3])
        self.assertEqual({m["verdict"] for m in r.values()}, {"ack"})
        self.assertIsNone(w.read())
        self.assertEqual(w.wait(), 0)
        self.assertEqual([x for x in self.records.all() if x["phase"] == "ack"], [])

    def test_daemon_gone_exits_1(self):
        w = self.started()
        w.event(1, "sleep.x", {"seconds": 0.3})
        os.close(w.res_r)
        w.res_r = os.open(os.devnull, os.O_RDONLY)  # for close()
        self.assertEqual(w.wait(), 1)
        self.assertIn("the daemon stopped reading the answers", w.stderr())


if __name__ == "__main__":
    unittest.main()
