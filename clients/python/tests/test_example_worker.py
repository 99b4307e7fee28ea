"""config/handlers/rag_worker.py, the shipped example config's rag.* worker."""
import os
import unittest

from workerproc import CLIENT_DIR, WorkerTestCase

RAG_WORKER = os.path.join(CLIENT_DIR, "..", "..", "config", "handlers", "rag_worker.py")


class RagWorkerTest(WorkerTestCase):
    def test_dfn_generated_acks_with_a_follow_up(self):
        w = self.started(RAG_WORKER)
        w.event(1, "rag.dfn_generated", {"dfn_id": "dfn-789", "speaker_id": "123", "draft_id": "draft-456"})
        self.assertEqual(w.results(1)[1], {"type": "result", "id": 1, "verdict": "ack", "emit": [
            {"event_type": "evaluation.started", "payload": {"evaluation_id": "eval-dfn-789", "dfn_id": "dfn-789"},
             "aggregate_id": "eval-dfn-789", "aggregate_type": "Evaluation"}]})
        w.close_input()
        self.assertEqual(w.wait(), 0)
        self.assertEqual(w.stdout(), "DFN generated: dfn_id='dfn-789' draft_id='draft-456' attempt=1\n")

    def test_untrusted_payloads(self):
        w = self.started(RAG_WORKER)
        w.event(1, "rag.dfn_generated", {"speaker_id": "123"})
        w.event(2, "rag.dfn_generated", {"dfn_id": 7})
        w.send({"type": "event", "id": 3, "event_type": "rag.dfn_generated", "event": {"payload": "x"}})
        w.event(4, "rag.dfn_generated", {"dfn_id": "\n" + "d" * 5000, "draft_id": "\x1b[2J"})
        w.event(5, "rag.reindexed")
        r = w.results(5)
        for i in (1, 2, 3):
            self.assertEqual((r[i]["verdict"], r[i]["reason"]), ("dead_letter", "bad_payload"))
        self.assertEqual(r[4]["verdict"], "ack")
        self.assertEqual(len(r[4]["emit"][0]["payload"]["dfn_id"]), 128)
        self.assertEqual(r[5], {"type": "result", "id": 5, "verdict": "ack"})
        w.close_input()
        self.assertEqual(w.wait(), 0)
        lines = w.stdout().splitlines()
        self.assertEqual(len(lines), 2)  # escaped: no line of the publisher's own
        self.assertTrue(all(len(line) < 400 and "\x1b" not in line for line in lines))
        self.assertEqual(lines[1], "rag event 'rag.reindexed': nothing to do")

    def test_runs_from_a_source_checkout_without_pythonpath(self):
        w = self.started(RAG_WORKER, env={"PYTHONPATH": ""})
        w.event(1, "rag.other")
        self.assertEqual(w.results(1)[1]["verdict"], "ack")


if __name__ == "__main__":
    unittest.main()
