"""Event-type patterns: '*' one word, '#' zero or more, first match wins."""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from event_router import Worker  # noqa: E402
from event_router._topics import compile_pattern, matches  # noqa: E402


def m(pattern, key):
    return matches(compile_pattern(pattern), key)


class PatternTest(unittest.TestCase):
    def test_words(self):
        self.assertTrue(m("speaker.onboarded", "speaker.onboarded"))
        self.assertFalse(m("speaker.onboarded", "speaker.onboarded.x"))
        self.assertFalse(m("speaker.onboarded", "speaker"))
        self.assertFalse(m("speaker.onboarded", "Speaker.onboarded"))

    def test_star_is_one_word(self):
        self.assertTrue(m("speaker.*", "speaker.updated"))
        self.assertFalse(m("speaker.*", "speaker"))
        self.assertFalse(m("speaker.*", "speaker.a.b"))
        self.assertTrue(m("*.completed", "evaluation.completed"))
        self.assertTrue(m("a.*.c", "a.b.c"))
        self.assertFalse(m("a.*.c", "a.c"))

    def test_hash_is_zero_or_more_words(self):
        for key in ("draft", "draft.ingested", "draft.correction_vector.created"):
            self.assertTrue(m("draft.#", key), key)
        self.assertFalse(m("draft.#", "drafts.x"))
        self.assertTrue(m("#", ""))
        self.assertTrue(m("#", "a.b.c"))
        self.assertTrue(m("#.failed", "failed"))
        self.assertTrue(m("#.failed", "evaluation.x.failed"))
        self.assertFalse(m("#.failed", "evaluation.failed.x"))
        self.assertTrue(m("a.#.z", "a.z"))
        self.assertTrue(m("a.#.z", "a.b.c.z"))
        self.assertTrue(m("#.*", "a"))
        self.assertFalse(m("#.*", ""))
        self.assertTrue(m("a.#.#.b", "a.b"))

    def test_long_untrusted_event_types(self):
        key = ".".join(["w"] * 100000)
        self.assertTrue(m("#.w", key))
        self.assertFalse(m("*.w", key))
        self.assertFalse(m("#.x.#.y", key))

    def test_bad_patterns(self):
        for bad in ("", None, 3):
            with self.assertRaises(ValueError):
                compile_pattern(bad)

    def test_first_registered_match_wins(self):
        w = Worker()
        def specific(e): pass
        def family(e): pass
        def anything(e): pass
        w.register_handler("speaker.onboarded", specific)
        w.register_handler("speaker.*", family)
        w.register_handler("#", anything)
        w.register_handler("speaker.updated", specific)  # never reached: speaker.* came first
        self.assertIs(w.handler_for("speaker.onboarded"), specific)
        self.assertIs(w.handler_for("speaker.updated"), family)
        self.assertIs(w.handler_for("draft.ingested"), anything)
        self.assertIs(w.handler_for(None), anything)

    def test_decorator_with_several_patterns(self):
        w = Worker()

        @w.on("rag.*", "draft.ingested")
        async def handle(event_data):
            pass
        self.assertIs(w.handler_for("rag.dfn_generated"), handle)
        self.assertIs(w.handler_for("draft.ingested"), handle)
        self.assertIsNone(w.handler_for("draft.other"))
        with self.assertRaises(TypeError):
            w.register_handler("x", "not callable")


if __name__ == "__main__":
    unittest.main()
