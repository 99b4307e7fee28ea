"""The shipped example handlers (config/handlers/) against untrusted event ids.

index-draft.sh writes $INDEX_DIR/$EVENT_ID.json: an id like "../../x" must be
dead-lettered (exit 65), never written outside INDEX_DIR.
"""
import os
import secrets
import unittest

from harness import SOURCE_DIR, RouterTestCase, no_retry

HANDLERS = os.path.join(SOURCE_DIR, "config", "handlers")
SCHEMAS_DIR = os.path.join(SOURCE_DIR, "config", "schemas", "events")


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


class ExampleHandlersTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.q = self.queue_name("drafts")
        # Two levels below the temp dir, so "../../x" would land inside it where we can see it.
        self.index = os.path.join(self.tmp, "a", "b", "index")

    def index_draft(self):
        return {"name": "index-draft", "events": ["draft.ingested"],
                "exec": [os.path.join(HANDLERS, "index-draft.sh")], "timeout": "30s",
                "env": {"INDEX_DIR": self.index}}

    async def test_index_draft_refuses_path_traversal_ids(self):
        cfg = self.config([dict({"name": self.q, "bindings": ["draft.*"], "handlers": [self.index_draft()]},
                                **no_retry())])
        d = await self.start_daemon(self.write_config(cfg))
        tag = secrets.token_hex(4)
        bad_ids = ["../../escape-" + tag, "../escape2-" + tag, ".hidden-" + tag, "sub/../../../escape3-" + tag,
                   "x" * 129]
        for eid in bad_ids:
            await self.publish(self.make_event("draft.ingested", {"n": 1}, event_id=eid))
        good = self.make_event("draft.ingested", {"n": 2})
        body = await self.publish(good)

        await d.wait_for_record("handled", event_id=good["event_id"], outcome="ack")
        dead = await self.get_all(self.q + ".dlq", expect=len(bad_ids))
        self.assertEqual(sorted(m.message_id for m in dead), sorted(bad_ids))
        for m in dead:
            self.assertEqual(m.headers.get("x-death-reason"), "handler_failed", m.headers)
            self.assertEqual(m.headers.get("x-death-handler"), "index-draft", m.headers)
            self.assertIn("65", str(m.headers.get("x-death-detail")), m.headers)

        # Only the valid event was written, inside INDEX_DIR; nothing anywhere else.
        self.assertEqual(files_under(self.index), [good["event_id"] + ".json"])
        with open(os.path.join(self.index, good["event_id"] + ".json"), "rb") as f:
            self.assertEqual(f.read(), body)
        outside = [p for p in files_under(self.tmp) if tag in p]
        self.assertEqual(outside, [], "a traversal id wrote outside INDEX_DIR")
        self.assertFalse(any(tag in n for n in os.listdir(os.path.dirname(self.tmp))), "wrote next to the temp dir")
        await self.wait_queue_counts(self.q, 0, 0)
        self.assertTrue(d.running())
        self.assertEqual(await d.stop(), 0)

    async def test_envelope_schema_rejects_unsafe_ids_before_any_handler(self):
        cfg = self.config([dict({"name": self.q, "bindings": ["draft.*"], "handlers": [self.index_draft()]},
                                **no_retry())], schemas=SCHEMAS_DIR)
        d = await self.start_daemon(self.write_config(cfg))
        payload = {"draft_id": "d1", "speaker_id": "s1", "source": "it", "word_count": 3}
        bad = self.make_event("draft.ingested", payload, event_id="../../escape-" + secrets.token_hex(4))
        await self.publish(bad)
        good = self.make_event("draft.ingested", payload)
        await self.publish(good)
        await d.wait_for_record("handled", event_id=good["event_id"], outcome="ack")
        dead = await self.get_all(self.q + ".dlq", expect=1)
        self.assertEqual([m.message_id for m in dead], [bad["event_id"]])
        self.assertEqual(dead[0].headers.get("x-death-reason"), "schema_violation", dead[0].headers)
        self.assertIn("event_id", str(dead[0].headers.get("x-death-detail")), dead[0].headers)
        self.assertEqual(files_under(self.index), [good["event_id"] + ".json"])
        self.assertEqual(await d.stop(), 0)

    async def test_rag_notify_dead_letters_malformed_events(self):
        q = self.queue_name("rag")
        h = {"name": "rag-notify", "events": ["rag.*"], "exec": [os.path.join(HANDLERS, "rag-notify.py")],
             "timeout": "30s"}
        cfg = self.config([dict({"name": q, "bindings": ["rag.*"], "handlers": [h]}, **no_retry())])
        d = await self.start_daemon(self.write_config(cfg))
        bad = self.make_event("rag.dfn_generated")
        bad["payload"] = ["not", "an", "object"]
        await self.publish(bad)
        good = self.make_event("rag.dfn_generated", {"dfn_id": "r1"})
        await self.publish(good)
        await d.wait_for_record("handled", event_id=good["event_id"], outcome="ack")
        dead = await self.get_all(q + ".dlq", expect=1)
        self.assertEqual([m.message_id for m in dead], [bad["event_id"]])
        self.assertEqual(dead[0].headers.get("x-death-reason"), "handler_failed", dead[0].headers)
        self.assertEqual(await d.stop(), 0)


class DockerCopiesTest(unittest.TestCase):
    def test_docker_handlers_are_the_safe_shipped_ones(self):
        # docker-compose mounts docker/handlers; they must not lag behind.
        for name in os.listdir(HANDLERS):
            with open(os.path.join(HANDLERS, name), "rb") as a, \
                    open(os.path.join(SOURCE_DIR, "docker", "handlers", name), "rb") as b:
                self.assertEqual(a.read(), b.read(), "docker/handlers/%s differs from config/handlers" % name)


if __name__ == "__main__":
    unittest.main()
