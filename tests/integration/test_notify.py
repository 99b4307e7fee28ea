"""systemd notifications (sd_notify) of the real daemon.

The test binds a unix datagram socket, hands it to the daemon as
NOTIFY_SOCKET (with WATCHDOG_USEC) and records every datagram with its arrival
time. Contract (src/daemon/daemon.cpp):
  READY=1 (with STATUS= naming the broker and the queue count) once the
  topology is declared and every queue is consumed, and only once; STATUS=
  every 5 s; WATCHDOG=1 every WATCHDOG_USEC/2 (only if WATCHDOG_PID, when
  set, is the daemon's pid); STOPPING=1 on SIGTERM; handlers never see
  NOTIFY_SOCKET. Reload (SIGHUP): RELOADING=1, then READY=1 again, once the
  daemon implements it; until then it logs "SIGHUP ignored" and that part is
  skipped.
Timing assertions are lower bounds (and "at least N pings in a generous
window").
"""
import asyncio
import os
import re
import signal
import socket
import threading
import time
import unittest
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional
from urllib.parse import urlsplit

from harness import AMQP_URL, READY_RE, RouterTestCase

from broker_node import BrokerNode


@dataclass
class Notice:
    at: float                    # time.monotonic() of arrival
    text: str
    fields: Dict[str, str]       # KEY=VALUE lines (the last value of a key wins)

    def has(self, key: str, value: Optional[str] = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifyListener:
    """A bound unix datagram socket and a thread that records what arrives."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.notices: List[Notice] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            fields = {}
            for line in text.split("\n"):
                if "=" in line:
                    k, _, v = line.partition("=")
                    fields[k] = v
            with self._lock:
                self.notices.append(Notice(time.monotonic(), text, fields))

    def all(self) -> List[Notice]:
        with self._lock:
            return list(self.notices)

    def close(self) -> None:
        self._stop.set()  # the thread ends at its next 0.2 s timeout
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def dump(self) -> str:
        t0 = self.notices[0].at if self.notices else 0
        return "\n".join("  +%.3fs %r" % (n.at - t0, n.text) for n in self.all())

    async def wait_for(self, pred: Callable[[Notice], bool], timeout: float, after: float = 0.0,
                       what: str = "notice", daemon=None) -> Notice:
        """The first notice (arrived at or after `after`) matching `pred`."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.all():
                if n.at >= after and pred(n):
                    return n
            if time.monotonic() > deadline:
                raise AssertionError("no %s within %.0fs; got:\n%s%s" % (
                    what, timeout, self.dump(), ("\ndaemon log:\n" + daemon.tail()) if daemon else ""))
            if daemon is not None and not daemon.running():
                await asyncio.sleep(0.3)  # a last datagram may be in flight
                for n in self.all():
                    if n.at >= after and pred(n):
                        return n
                raise AssertionError("daemon exited (%s) before sending %s; got:\n%s\nlog:\n%s"
                                     % (daemon.returncode, what, self.dump(), daemon.tail()))
            await asyncio.sleep(0.05)


def host_port(url: str) -> str:
    u = urlsplit(url)
    return "%s:%d" % (u.hostname, u.port or (5671 if u.scheme == "amqps" else 5672))


class NotifyTestBase(RouterTestCase):
    def daemon_env(self, extra=None):
        env = super().daemon_env(None)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        if extra:
            env.update(extra)
        return env

    def listener(self) -> NotifyListener:
        n = NotifyListener(os.path.join(self.tmp, "notify.sock"))
        self.addCleanup(n.close)
        return n

    def notify_env(self, listener: NotifyListener, watchdog_usec: Optional[int] = 1000000, **more: str):
        env = {"NOTIFY_SOCKET": listener.path}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        env.update(more)
        return env


class NotifyTest(NotifyTestBase):
    async def test_ready_status_watchdog_stopping_in_order(self):
        queues = [self.queue_name(s) for s in ("a", "b", "c")]
        record = self.record_file("rec")
        cfg = self.config([{"name": q, "bindings": ["n%d.*" % i],
                            "handlers": [self.recorder("rec%d" % i, record=record)]}
                           for i, q in enumerate(queues)])
        path = self.write_config(cfg)
        ln = self.listener()
        t_start = time.monotonic()
        d = await self.start_daemon(path, env=self.notify_env(ln), wait_ready=False)

        ready = await ln.wait_for(lambda n: n.has("READY", "1"), 30, what="READY=1", daemon=d)
        # The moment READY=1 arrived: the daemon had logged "ready" and a
        # "consuming" line for every queue, and the broker lists a consumer on each.
        log_at_ready = d.log()
        self.assertRegex(log_at_ready, READY_RE, "READY=1 before the 'ready' log line")
        for q in queues:
            self.assertTrue(d.records("consuming", queue=q), "READY=1 before consuming %s:\n%s" % (q, log_at_ready))
        for q in queues:
            info = await self.queue_info(q)
            self.assertIsNotNone(info, q)
            self.assertGreaterEqual(info["consumers"], 1, "no consumer on %s after READY=1" % q)
        # READY=1 carries a STATUS naming the node and the queue count.
        self.assertIn("STATUS", ready.fields, ready.text)
        status = ready.fields["STATUS"]
        self.assertIn("consuming 3 queues", status)
        self.assertIn(host_port(AMQP_URL), status)
        self.assertNotIn(":%s@" % (urlsplit(AMQP_URL).password or "\0"), status)

        # An event, handled: its handler sees none of the notify variables.
        ev = self.make_event("n0.thing")
        await self.publish(ev)
        recs = await self.wait_records(record, 1)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            self.assertNotIn(k, recs[0]["env"], "exec handler inherited %s" % k)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.5 s: at least 2 in 2.5 s, never
        # two closer than the period allows.
        w0 = time.monotonic()
        await asyncio.sleep(2.5)
        pings = [n for n in ln.all() if n.has("WATCHDOG", "1") and n.at >= w0]
        self.assertGreaterEqual(len(pings), 2, "WATCHDOG=1 pings in 2.5 s:\n" + ln.dump())
        all_pings = [n.at for n in ln.all() if n.has("WATCHDOG", "1")]
        gaps = [b - a for a, b in zip(all_pings, all_pings[1:])]
        # Arrival times are taken when the listener reads, so one late read
        # shortens the next gap; a daemon pinging too often makes every
        # gap short, so pairs of gaps are what must keep the period.
        pairs = [(a + b) / 2 for a, b in zip(gaps, gaps[1:])] or gaps
        self.assertGreaterEqual(min(pairs), 0.35, "watchdog pings closer than WATCHDOG_USEC/2: %r" % gaps)

        # STATUS= on its own, every 5 s (the first one 5 s after start); once the
        # event is counted it says so.
        st = await ln.wait_for(lambda n: n.has("STATUS") and not n.has("READY") and
                               "events handled 1" in n.fields["STATUS"], 15, after=ready.at,
                               what="a periodic STATUS= counting the event", daemon=d)
        self.assertGreaterEqual(st.at - t_start, 4.5, "periodic STATUS before 5 s")
        self.assertIn("consuming 3 queues", st.fields["STATUS"])

        # SIGTERM: STOPPING=1.
        t_term = time.monotonic()
        d.send_signal(signal.SIGTERM)
        stopping = await ln.wait_for(lambda n: n.has("STOPPING", "1"), 20, after=t_term, what="STOPPING=1")
        self.assertEqual(await d.wait_exit(30), 0, d.tail())
        await asyncio.sleep(0.3)

        notices = ln.all()
        idx = {id(n): i for i, n in enumerate(notices)}
        readies = [n for n in notices if n.has("READY", "1")]
        self.assertEqual(len(readies), 1, "READY=1 sent %d times:\n%s" % (len(readies), ln.dump()))
        self.assertLess(idx[id(ready)], idx[id(st)])
        self.assertLess(idx[id(st)], idx[id(stopping)])
        self.assertLess(idx[id(pings[0])], idx[id(stopping)])
        # Nothing but watchdog pings after STOPPING=1 (no READY, no new STATUS).
        after = [n for n in notices[idx[id(stopping)] + 1:] if not n.has("WATCHDOG")]
        self.assertEqual(after, [], "after STOPPING=1:\n" + ln.dump())
        self.assertIn("STATUS", stopping.fields, "STOPPING=1 without a STATUS")

    async def test_no_watchdog_pings_for_another_pid_or_without_usec(self):
        q = self.queue_name("w")
        path = self.write_config(self.config([{"name": q, "bindings": ["w.*"], "handlers": [self.recorder()]}]))
        # WATCHDOG_PID names another process: the watchdog is not ours.
        ln = self.listener()
        d = await self.start_daemon(path, env=self.notify_env(ln, 200000, WATCHDOG_PID="1"), wait_ready=False)
        await ln.wait_for(lambda n: n.has("READY", "1"), 30, what="READY=1", daemon=d)
        await asyncio.sleep(1.5)
        self.assertEqual([n for n in ln.all() if n.has("WATCHDOG")], [], ln.dump())
        self.assertEqual(await d.stop(), 0, d.tail())
        ln.close()
        # No WATCHDOG_USEC at all: READY and STOPPING still come, no pings.
        ln2 = self.listener()
        d2 = await self.start_daemon(path, env=self.notify_env(ln2, None), wait_ready=False)
        await ln2.wait_for(lambda n: n.has("READY", "1"), 30, what="READY=1", daemon=d2)
        await asyncio.sleep(1.5)
        self.assertEqual(await d2.stop(), 0, d2.tail())
        await ln2.wait_for(lambda n: n.has("STOPPING", "1"), 5, what="STOPPING=1")
        self.assertEqual([n for n in ln2.all() if n.has("WATCHDOG")], [], ln2.dump())

    async def test_without_notify_socket_nothing_breaks(self):
        q = self.queue_name("plain")
        rec = self.recorder()
        path = self.write_config(self.config([{"name": q, "bindings": ["p.*"], "handlers": [rec]}]))
        d = await self.start_daemon(path, env={"WATCHDOG_USEC": "100000"})
        ev = self.make_event("p.x")
        await self.publish(ev)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        self.assertEqual(await d.stop(), 0, d.tail())

    async def test_sighup_reload_notifies_reloading_then_ready(self):
        q = self.queue_name("hup")
        rec = self.recorder()
        path = self.write_config(self.config([{"name": q, "bindings": ["h.*"], "handlers": [rec]}]))
        ln = self.listener()
        d = await self.start_daemon(path, env=self.notify_env(ln), wait_ready=False)
        ready = await ln.wait_for(lambda n: n.has("READY", "1"), 30, what="READY=1", daemon=d)
        await d.wait_for_log(READY_RE)
        log_len = len(d.log())
        t_hup = time.monotonic()
        d.send_signal(signal.SIGHUP)
        await ln.wait_for(lambda n: n.at >= t_hup and n.has("RELOADING", "1"), 15,
                          what="RELOADING=1 after SIGHUP", daemon=d)
        reloading = next(n for n in ln.all() if n.at >= t_hup and n.has("RELOADING", "1"))
        again = await ln.wait_for(lambda n: n.has("READY", "1"), 30, after=reloading.at,
                                  what="READY=1 after RELOADING=1", daemon=d)
        notices = ln.all()
        self.assertLess(notices.index(reloading), notices.index(again))
        self.assertLess(notices.index(ready), notices.index(reloading))
        # systemd's Type=notify-reload wants MONOTONIC_USEC with RELOADING=1.
        if "MONOTONIC_USEC" in reloading.fields:
            self.assertRegex(reloading.fields["MONOTONIC_USEC"], r"^\d+$")
        ev = self.make_event("h.after")
        await self.publish(ev)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")

        # A reload that fails (broken config) still ends with READY=1: the
        # daemon keeps running on the old config.
        with open(path, "a") as f:
            f.write("no_such_key: [\n")
        t_hup2 = time.monotonic()
        d.send_signal(signal.SIGHUP)
        r2 = await ln.wait_for(lambda n: n.has("RELOADING", "1"), 15, after=t_hup2, what="RELOADING=1 (bad config)",
                               daemon=d)
        await ln.wait_for(lambda n: n.has("READY", "1"), 15, after=r2.at, what="READY=1 after a failed reload",
                          daemon=d)
        await d.wait_for_log(r"reload failed", timeout=10)
        ev = self.make_event("h.after2")
        await self.publish(ev)
        await d.wait_for_record("handled", event_id=ev["event_id"], outcome="ack")
        self.assertEqual(await d.stop(), 0, d.tail())


class NotifyBrokerDownTest(NotifyTestBase):
    """READY=1 waits for the broker; an outage shows in STATUS, not in a second READY."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.node = BrokerNode.for_class(cls, start=False)

    async def test_ready_waits_for_the_broker_and_is_sent_once(self):
        node = self.node
        q = self.queue_name("late")
        cfg = self.config([{"name": q, "bindings": ["l.*"], "handlers": [self.recorder()]}])
        cfg["broker"] = {"url": node.url, "heartbeat": "5s", "reconnect": {"initial": "200ms", "max": "1s"}}
        path = self.write_config(cfg)
        ln = self.listener()
        d = await self.start_daemon(path, env=self.notify_env(ln), wait_ready=False)
        await d.wait_for_record("broker unavailable, retrying", timeout=15)
        # While the broker is down: watchdog pings (the loop runs), no READY.
        await asyncio.sleep(2.0)
        self.assertTrue(d.running(), d.tail())
        self.assertFalse([n for n in ln.all() if n.has("READY")], "READY=1 with no broker:\n" + ln.dump())
        self.assertGreaterEqual(len([n for n in ln.all() if n.has("WATCHDOG", "1")]), 2, ln.dump())

        await asyncio.to_thread(node.start)
        t_up = time.monotonic()
        ready = await ln.wait_for(lambda n: n.has("READY", "1"), 30, what="READY=1 after the broker came up",
                                  daemon=d)
        self.assertGreaterEqual(ready.at, t_up - 10)
        self.assertIn("127.0.0.1:%d" % node.port, ready.fields.get("STATUS", ""))
        self.assertTrue(d.records("consuming", queue=q), d.tail())
        rows = await asyncio.to_thread(node.ctl_json, "list_queues", "name", "consumers")
        self.assertEqual([r["consumers"] for r in rows if r["name"] == q], [1], rows)

        # The broker goes away: a periodic STATUS says so; READY=1 is not sent again.
        await asyncio.to_thread(node.stop)
        t_down = time.monotonic()
        await d.wait_for_record("connection lost", timeout=20)
        down = await ln.wait_for(lambda n: n.has("STATUS") and "not connected" in n.fields["STATUS"], 15,
                                 after=t_down, what="STATUS saying 'not connected'", daemon=d)
        self.assertNotIn("READY", down.fields)
        await asyncio.to_thread(node.start)
        back = await ln.wait_for(lambda n: n.has("STATUS") and "consuming 1 queues" in n.fields["STATUS"], 40,
                                 after=down.at, what="STATUS 'consuming' after the broker came back", daemon=d)
        self.assertEqual(len([n for n in ln.all() if n.has("READY", "1")]), 1,
                         "READY=1 sent again after a reconnect:\n" + ln.dump())
        self.assertGreater(back.at, down.at)
        self.assertEqual(await d.stop(), 0, d.tail())


if __name__ == "__main__":
    unittest.main()
