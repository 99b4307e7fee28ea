"""The reference guide's Python handlers (event-infrastructure-guide.md), copied
unchanged into tests/workers/guide_*.py, run under the helper: a return acks,
a raise retries."""
import os
import re
import unittest

from workerproc import HERE, WORKERS, WorkerTestCase

# The guide lives next to the repository (the issue's ../shared/reference/).
GUIDE = os.path.join(HERE, "..", "..", "..", "..", "shared", "reference", "event-infrastructure-guide.md")


class GuideExamplesTest(WorkerTestCase):
    def test_consuming_events_handler(self):
        w = self.started("guide_consumer.py")
        w.event(1, "speaker.onboarded", {"speaker_id": "123", "external_id": "ext-123", "name": "John Doe",
                                         "bucket": "GOOD"})
        w.event(2, "speaker.onboarded", {"name": "no id"})
        r = w.results(2)
        self.assertEqual(r[1], {"type": "result", "id": 1, "verdict": "ack"})
        self.assertEqual(r[2], {"type": "result", "id": 2, "verdict": "retry", "reason": "handler_failed",
                                "detail": "KeyError: 'speaker_id'"})
        w.close_input()
        self.assertEqual(w.wait(), 0)
        self.assertEqual(w.stdout(), "Speaker onboarded: 123\n")  # its print went to the log, not the protocol

    def test_idempotent_handler(self):
        w = self.started("guide_idempotent.py")
        w.event(1, "speaker.onboarded", {"speaker_id": "s-1"})
        self.assertEqual(w.results(1)[1]["verdict"], "ack")
        w.event(2, "speaker.onboarded", {"speaker_id": "s-1"})  # a duplicate
        self.assertEqual(w.results(1)[2]["verdict"], "ack")
        w.event(3, "speaker.onboarded", {"speaker_id": "flaky-1"})
        self.assertEqual(w.results(1)[3], {"type": "result", "id": 3, "verdict": "retry", "reason": "handler_failed",
                                           "detail": "ConnectionError: database unavailable"})
        w.event(4, "speaker.onboarded", {"speaker_id": "flaky-1"}, event_id="ev-3", attempt=2)  # the retry
        self.assertEqual(w.results(1)[4]["verdict"], "ack")
        self.assertEqual(self.records.all(), [
            {"processed": "s-1"},
            {"log": "info", "msg": "Event already processed", "speaker_id": "s-1"},
            {"processed": "flaky-1"}])

    def test_handle_errors_gracefully(self):
        w = self.started("guide_errors.py")
        w.event(1, "speaker.onboarded", {"speaker_id": "1"})
        w.event(2, "draft.ingested")
        self.assertEqual({m["verdict"] for m in w.results(2).values()}, {"ack"})
        self.assertEqual(self.records.all(), [])  # nothing failed, nothing logged

    @unittest.skipUnless(os.path.isfile(GUIDE), "the reference guide is not next to the repository")
    def test_the_examples_are_the_guides_own(self):
        with open(GUIDE) as f:
            guide = f.read()
        for name in ("guide_consumer.py", "guide_idempotent.py", "guide_errors.py"):
            with open(os.path.join(WORKERS, name)) as f:
                code = re.search(r"# --- from event-infrastructure-guide.md[^\n]*\n(.*?)# --- end of the guide's code ---",
                                 f.read(), re.S).group(1)
            self.assertIn(code, guide, name)


if __name__ == "__main__":
    unittest.main()
