"""`event-router --check`: validates the config, prints the plan, and points
at the offending key (file:line:column) when something is wrong."""
import os
import re
import shutil
import subprocess
import unittest

from harness import BINARY, BUILD_DIR, RECORD_HANDLER, RouterTestCase, run_check

SECRET = "Sup3rS3cretPw"

GOOD = """\
broker:
  url: "amqp://alice:%(secret)s@127.0.0.1:5672/"
  heartbeat: 30s
exchange:
  name: ${ER_TEST_EXCHANGE:-check-default.events}
  type: topic
shutdown_timeout: 5s
queues:
  - name: ${ER_TEST_QUEUE}
    bindings: ["speaker.*"]
    prefetch: 10
    unhandled: dead-letter
    handlers:
      - name: speaker-log
        events: ["speaker.*"]
        plugin: liblog_plugin.so
        config: {prefix: "speaker"}
      - name: catch-all-rec
        events: ["#"]
        exec: ["%(record)s", "/tmp/never-written.jsonl", "--token=%(secret)s-arg"]
        timeout: 30s
        env: {FOO: bar}
        inherit_env: [HOME]
  - name: draft-q-%(tag)s
    bindings: ["draft.*"]
    unhandled: ack
    handlers:
      - name: draft-noop
        events: ["#"]
        plugin: libnoop_plugin.so
"""


def line_of(text, needle):
    """1-based line number and 1-based column of the first occurrence of `needle`."""
    for i, line in enumerate(text.splitlines(), 1):
        col = line.find(needle)
        if col >= 0:
            return i, col + 1
    raise AssertionError("%r not in config" % needle)


class CheckTest(RouterTestCase):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.tag = self.prefix
        self.queue = self.prefix + ".check-q"
        self.good = GOOD % {"secret": SECRET, "record": RECORD_HANDLER, "tag": self.tag}
        self.env = self.daemon_env({"ER_TEST_QUEUE": self.queue})

    def check(self, text, name="router.yaml", env=None, cwd=None):
        path = self.write_config(text, name)
        e = dict(self.env if env is None else env)
        e.pop("EVENT_ROUTER_PLUGIN_DIR", None)
        p = subprocess.run([BINARY, "--config", path, "--check"], capture_output=True, text=True, env=e,
                           timeout=60, stdin=subprocess.DEVNULL, cwd=cwd or self.tmp)
        return path, p

    def assert_error_at(self, text, needle, *, names, line_needle=None, name="router.yaml", columns=None):
        """--check fails (exit 1) with `<path>:<line>:<col>: message` on stderr,
        at the line of `line_needle` (default `needle`), the message naming `names`."""
        bad_text = text
        path, p = self.check(bad_text, name)
        self.assertEqual(p.returncode, 1, "exit status %d\nstdout:\n%s\nstderr:\n%s" % (p.returncode, p.stdout, p.stderr))
        m = re.search(r"(?m)^%s:(\d+):(\d+): (.+)$" % re.escape(path), p.stderr)
        self.assertIsNotNone(m, "no '%s:<line>:<col>: message' on stderr:\n%s" % (path, p.stderr))
        want_line, want_col = line_of(bad_text, line_needle or needle)
        self.assertEqual(int(m.group(1)), want_line, "wrong line: %s" % m.group(0))
        if columns is not None:
            self.assertIn(int(m.group(2)), columns, "wrong column: %s" % m.group(0))
        else:
            self.assertGreaterEqual(int(m.group(2)), 1, m.group(0))
        self.assertIn(names, m.group(3), "message does not name %r: %s" % (names, m.group(0)))
        self.assertNotIn(SECRET, p.stdout + p.stderr, "broker password leaked")
        return m

    async def test_good_config_prints_plan_and_hides_password(self):
        path, p = self.check(self.good)
        self.assertEqual(p.returncode, 0, "stdout:\n%s\nstderr:\n%s" % (p.stdout, p.stderr))
        out = p.stdout
        for name in (self.queue, self.queue + ".dlq", "draft-q-" + self.tag, "speaker-log", "catch-all-rec",
                     "draft-noop", "check-default.events", "speaker.*", "draft.*"):
            self.assertIn(name, out, "--check output lacks %r:\n%s" % (name, out))
        self.assertNotIn(SECRET, p.stdout + p.stderr, "broker password leaked by --check")
        self.assertNotIn("${", out, "unsubstituted variable in the plan")
        # Exec handlers: the program and the argument count, never the arguments.
        self.assertIn("exec %s (2 arguments)" % RECORD_HANDLER, out)
        self.assertNotIn("never-written", out)

    async def test_env_default_is_overridden_by_variable(self):
        env = dict(self.env, ER_TEST_EXCHANGE=self.prefix + ".from-env")
        path, p = self.check(self.good, env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(self.prefix + ".from-env", p.stdout)
        self.assertNotIn("check-default.events", p.stdout)

    async def test_config_from_environment_variable(self):
        path = self.write_config(self.good)
        env = dict(self.env, EVENT_ROUTER_CONFIG=path)
        p = run_check(None, env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(self.queue, p.stdout)

    async def test_unset_variable_without_default_is_an_error(self):
        env = dict(self.env)
        env.pop("ER_TEST_QUEUE", None)
        path, p = self.check(self.good, env=env)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("ER_TEST_QUEUE", p.stderr)
        self.assertRegex(p.stderr, r"(?m)^%s:\d+:\d+: " % re.escape(path))

    async def test_unknown_key_typo(self):
        bad = self.good.replace("    prefetch: 10\n", "    prefecth: 10\n")
        self.assert_error_at(bad, "prefecth", names="prefecth", columns=(5,))

    async def test_unknown_top_level_key(self):
        bad = self.good.replace("shutdown_timeout: 5s\n", "shutdown_timout: 5s\n")
        self.assert_error_at(bad, "shutdown_timout", names="shutdown_timout", columns=(1,))

    async def test_bad_duration(self):
        bad = self.good.replace("        timeout: 30s\n", "        timeout: 30 parsecs\n")
        line, col = line_of(bad, "timeout: 30 parsecs")
        self.assert_error_at(bad, "timeout: 30 parsecs", names="timeout", columns=(col, col + len("timeout: ")))

    async def test_invalid_broker_url(self):
        # A URL the daemon can never connect with is a config error, not something to retry forever.
        for url in ("http://alice:%s@127.0.0.1:5672/" % SECRET, "amqp://alice:%s@127.0.0.1:notaport/" % SECRET):
            with self.subTest(url=url.replace(SECRET, "****")):
                bad = self.good.replace('url: "amqp://alice:%s@127.0.0.1:5672/"' % SECRET, 'url: "%s"' % url)
                self.assertNotEqual(bad, self.good)
                self.assert_error_at(bad, "url:", names="url")

    async def test_tls_block_with_plain_url_is_refused(self):
        # Ignoring it would send the password in clear while the config reads as TLS.
        bad = self.good.replace("  heartbeat: 30s\n", "  heartbeat: 30s\n  tls: {verify_peer: true}\n", 1)
        self.assertNotEqual(bad, self.good)
        m = self.assert_error_at(bad, "tls:", names="broker.tls")
        self.assertIn("amqps://", m.group(3))

    async def test_tls_without_verification_warns(self):
        for key in ("verify_peer", "verify_hostname"):
            with self.subTest(key=key):
                text = self.good.replace('url: "amqp://alice:', 'url: "amqps://alice:', 1).replace(
                    "  heartbeat: 30s\n", "  heartbeat: 30s\n  tls: {%s: false}\n" % key, 1)
                path, p = self.check(text)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertRegex(p.stderr, r"(?m)^%s: warning: broker\.tls\.%s is false" % (re.escape(path), key))
                self.assertNotIn(SECRET, p.stdout + p.stderr)
        path, p = self.check(self.good.replace('url: "amqp://alice:', 'url: "amqps://alice:', 1))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("warning", p.stderr)

    async def test_unterminated_variable_names_the_place_not_the_value(self):
        bad = self.good.replace('url: "amqp://alice:%s@127.0.0.1:5672/"' % SECRET,
                                'url: "amqp://alice:%s@127.0.0.1:5672/${VHOST"' % SECRET)
        self.assertNotEqual(bad, self.good)
        m = self.assert_error_at(bad, "url:", names="broker.url")  # also asserts SECRET is not printed
        self.assertIn("unterminated", m.group(3))

    async def test_missing_plugin(self):
        bad = self.good.replace("plugin: liblog_plugin.so", "plugin: libdoes_not_exist_xyz.so")
        self.assert_error_at(bad, "libdoes_not_exist_xyz.so", names="libdoes_not_exist_xyz.so")

    async def test_missing_executable(self):
        bad = self.good.replace('exec: ["%s"' % RECORD_HANDLER, 'exec: ["/nonexistent/handler-xyz"')
        self.assertNotEqual(bad, self.good)
        self.assert_error_at(bad, "/nonexistent/handler-xyz", names="/nonexistent/handler-xyz")

    async def test_non_executable_file(self):
        plain = os.path.join(self.tmp, "not-executable.sh")
        with open(plain, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(plain, 0o644)
        bad = self.good.replace('exec: ["%s"' % RECORD_HANDLER, 'exec: ["%s"' % plain)
        self.assert_error_at(bad, plain, names="not-executable.sh")

    async def test_plugin_path_relative_to_config_folder(self):
        src = os.path.join(BUILD_DIR, "plugins", "liblog_plugin.so")
        if not os.path.exists(src):
            self.skipTest("no built plugin at " + src)
        os.makedirs(os.path.join(self.tmp, "myplugins"))
        shutil.copy(src, os.path.join(self.tmp, "myplugins", "liblog_plugin.so"))
        text = self.good.replace("plugin: liblog_plugin.so", "plugin: myplugins/liblog_plugin.so")
        path, p = self.check(text, cwd="/")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("speaker-log", p.stdout)

    async def test_missing_config_file(self):
        path = os.path.join(self.tmp, "nope.yaml")
        p = subprocess.run([BINARY, "--config", path, "--check"], capture_output=True, text=True, timeout=60,
                           env=self.env, stdin=subprocess.DEVNULL)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("nope.yaml", p.stderr)

    async def test_version_and_help(self):
        p = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"\d+\.\d+\.\d+")
        p = subprocess.run([BINARY, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("--config", p.stdout)
        self.assertIn("--check", p.stdout)


if __name__ == "__main__":
    unittest.main()
