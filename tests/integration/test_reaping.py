"""Processes an exec handler leaves behind: its background jobs are killed
when it exits, and the daemon (a child subreaper) adopts and reaps every
orphan, so no zombie is left in its process tree."""
import asyncio
import os
import signal
import stat
import textwrap
import time
from typing import List, Optional, Tuple

from harness import RouterTestCase


def proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state, ppid) of a process, or None once it is gone (reaped)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def descendants(pid: int) -> List[Tuple[int, str]]:
    """(pid, state) of every process below `pid`."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st:
                children.setdefault(st[1], []).append((int(name), st[0]))
    out, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            out.append(child)
            pending.append(child[0])
    return out


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class ReapingTest(RouterTestCase):
    async def test_background_processes_of_a_handler_are_killed_and_reaped(self):
        queue = self.queue_name("work")
        left = os.path.join(self.tmp, "left.pid")  # a background job in the handler's process group
        escaped = os.path.join(self.tmp, "escaped.pid")  # one in a session of its own
        script = os.path.join(self.tmp, "background.sh")
        with open(script, "w") as f:
            f.write(textwrap.dedent("""\
                #!/bin/sh
                cat >/dev/null
                sleep 300 </dev/null >/dev/null 2>&1 &
                echo $! > '%(left)s'
                setsid sh -c 'echo $$ > "$1"; exec sleep 3' sh '%(escaped)s' </dev/null >/dev/null 2>&1 &
                while [ ! -s '%(escaped)s' ]; do sleep 0.01; done
                exit 0
                """ % {"left": left, "escaped": escaped}))
        os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR)
        self.addCleanup(self._kill_leftovers, left, escaped)
        cfg = self.write_config(self.config([{
            "name": queue, "bindings": ["reap.#"],
            "handlers": [{"name": "background", "events": ["#"], "exec": [script], "timeout": "20s"}]}]))
        daemon = await self.start_daemon(cfg)
        ev = self.make_event("reap.created", {"n": 1})
        await self.publish(ev)
        await daemon.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")

        # Outside the handler's group: not killed, but adopted by the daemon.
        escaped_pid = read_pid(escaped)
        st = proc_stat(escaped_pid)
        self.assertIsNotNone(st, "the escaped process ended too early for the test")
        self.assertEqual(st[1], daemon.pid, "not adopted by the daemon (child subreaper): %r" % (st,))

        # The background job in its group: killed and reaped (no /proc entry, not even a zombie).
        left_pid = read_pid(left)
        deadline = time.monotonic() + 5
        while proc_stat(left_pid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertIsNone(proc_stat(left_pid), "the handler's background job is still there")

        # The escaped one exits by itself (3 s) and is reaped by the daemon.
        deadline = time.monotonic() + 15
        while proc_stat(escaped_pid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertIsNone(proc_stat(escaped_pid), "the adopted process was not reaped: %r" % (proc_stat(escaped_pid),))
        self.assertEqual([p for p in descendants(daemon.pid) if p[1] == "Z"], [])
        self.assertTrue(daemon.running())
        self.assertEqual(await daemon.stop(), 0)

    def _kill_leftovers(self, *pidfiles: str) -> None:
        # Only for a failing run (the old behaviour): do not leave sleeps behind.
        for path in pidfiles:
            try:
                pid = read_pid(path)
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if b"sleep" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    import unittest
    unittest.main()
