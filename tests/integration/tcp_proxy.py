"""A small TCP proxy for fault injection: put it between the daemon and the
broker and cut the connections on command or at random moments.

    proxy = TcpProxy("127.0.0.1", 5672)   # listens on a free port of 127.0.0.1
    proxy.start()                          # its own thread and event loop
    url = "amqp://guest:guest@127.0.0.1:%d/" % proxy.port
    proxy.cut_all()                        # abort (RST) every current connection
    proxy.start_random_cuts(0.5, 2.0)      # ... every 0.5-2 s, until stopped
    proxy.stop_random_cuts()
    proxy.set_refusing(True)               # new connections are closed at once
    proxy.freeze()                         # stop forwarding, keep sockets open
    proxy.freeze_current()                 # ... on current connections only
    proxy.freeze_after(1 << 20)            # current ones: pass 1 MiB more from the
                                           # broker, then hold both directions
    proxy.freeze_new_after_method(40, 11)  # new ones: hold right after the broker's
                                           # exchange.declare-ok (None: stop doing so)
    proxy.stop()

Thread-safe control: every method may be called from any thread (the tests
call it from their asyncio loop). `cuts` lists (unix time, connections cut)
for each cut; `accepted` counts accepted connections.

Standalone: python3 tcp_proxy.py [--listen-port P] [--cut-every MIN MAX]
  TARGET_HOST TARGET_PORT
"""
import argparse
import asyncio
import random
import socket
import threading
import time
from typing import List, Optional, Set, Tuple


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0):
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.port = 0
        self.accepted = 0
        self.cuts: List[Tuple[float, int]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self._conns: Set["_Pair"] = set()
        self._random_task = None
        self._refusing = False
        self._frozen = False
        self._hold_after_method: Optional[Tuple[int, int]] = None
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("tcp proxy did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, self.listen_host, self.listen_port, reuse_address=True))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        # stopped: close what is left
        self._server.close()
        for p in list(self._conns):
            p.abort()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def stop(self) -> None:
        if not self._loop or not self._thread:
            return
        self._call(self._stop_random)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def _call(self, fn, *args):
        """Runs fn(*args) on the proxy loop and returns its result."""
        if not self._loop:
            raise RuntimeError("proxy not started")
        done = threading.Event()
        box = {}

        def run():
            try:
                box["v"] = fn(*args)
            except BaseException as e:  # pragma: no cover
                box["e"] = e
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("proxy loop did not answer")
        if "e" in box:
            raise box["e"]
        return box.get("v")

    # -- controls --------------------------------------------------------

    def connection_count(self) -> int:
        return self._call(lambda: len(self._conns))

    def cut_all(self) -> int:
        """Aborts every current connection (both sides get a RST). Returns how many."""
        return self._call(self._cut_all)

    def _cut_all(self) -> int:
        pairs = list(self._conns)
        for p in pairs:
            p.abort()
        self.cuts.append((time.time(), len(pairs)))
        return len(pairs)

    def set_refusing(self, refusing: bool) -> None:
        """While refusing, accepted connections are closed at once."""
        self._refusing = refusing

    def freeze(self, frozen: bool = True) -> None:
        """While frozen, bytes are neither read nor forwarded (a black hole:
        connections stay open, only heartbeats can notice)."""
        self._call(self._set_frozen, frozen)

    def freeze_current(self) -> int:
        """Stops forwarding on the connections open now (a silent network
        partition: no RST, no FIN); new connections pass normally. Returns
        how many were frozen. cut_all() ends them."""
        return self._call(self._freeze_current)

    def _freeze_current(self) -> int:
        for p in self._conns:
            p.set_paused(True)
        return len(self._conns)

    def freeze_after(self, nbytes: int) -> int:
        """On the connections open now, forwards at most `nbytes` more bytes
        from the broker to the client, then holds: both directions stop, the
        sockets stay open (a broker that stops answering mid-message). What
        the broker sends meanwhile stays in the proxy; freeze(False) forwards
        it and resumes. Returns how many connections were armed."""
        return self._call(self._freeze_after, nbytes)

    def _freeze_after(self, nbytes: int) -> int:
        for p in self._conns:
            p.hold_after(nbytes)
        return len(self._conns)

    def freeze_new_after_method(self, class_id: Optional[int], method_id: int = 0) -> None:
        """Connections accepted from now on forward the broker's frames up to
        and including the first method frame (class_id, method_id), e.g.
        (10, 41) connection.open-ok or (40, 11) exchange.declare-ok, then hold
        like freeze_after(). None stops arming new connections; freeze(False)
        releases the held ones."""
        self._hold_after_method = None if class_id is None else (class_id, method_id)

    def held_count(self) -> int:
        """Connections holding now after freeze_after / freeze_new_after_method."""
        return self._call(lambda: sum(1 for p in self._conns if p.holding))

    def _set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        for p in self._conns:
            p.set_paused(frozen)

    def start_random_cuts(self, min_s: float = 0.5, max_s: float = 2.0, seed: Optional[int] = None) -> None:
        self._call(self._start_random, min_s, max_s, seed)

    def _start_random(self, min_s, max_s, seed):
        self._stop_random()
        rng = random.Random(seed)

        async def loop():
            while True:
                await asyncio.sleep(rng.uniform(min_s, max_s))
                self._cut_all()

        self._random_task = asyncio.ensure_future(loop())

    def stop_random_cuts(self) -> None:
        self._call(self._stop_random)

    def _stop_random(self):
        if self._random_task:
            self._random_task.cancel()
            self._random_task = None

    # -- forwarding ------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _abort(writer)
            return
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _abort(writer)
            return
        pair = _Pair(reader, writer, up_r, up_w)
        self._conns.add(pair)
        if self._frozen:
            pair.set_paused(True)
        if self._hold_after_method is not None:
            pair.hold_after_method(*self._hold_after_method)
        try:
            await pair.run()
        finally:
            self._conns.discard(pair)


def _abort(w: asyncio.StreamWriter) -> None:
    try:
        sock = w.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: close sends a RST, like a dropped NAT entry or a crashed peer.
            import struct
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    w.transport.abort()


class _MethodScanner:
    """Finds the end of the first AMQP method frame (class_id, method_id) in
    a byte stream fed in pieces. Frames: type(1) channel(2) size(4) payload
    frame-end(1); a method payload starts with class-id(2) method-id(2)."""

    LIMIT = 1 << 20  # give up (never match) past this many bytes

    def __init__(self, class_id: int, method_id: int):
        self.want = (class_id, method_id)
        self.buf = bytearray()
        self.pos = 0  # start of the next unparsed frame in buf

    def feed(self, data: bytes) -> Optional[int]:
        """How many bytes of `data` to forward before holding (the frame's
        end), or None if the frame is not complete within `data`."""
        base = len(self.buf)
        self.buf += data
        while len(self.buf) - self.pos >= 7:
            ftype = self.buf[self.pos]
            size = int.from_bytes(self.buf[self.pos + 3:self.pos + 7], "big")
            end = self.pos + 7 + size + 1
            if len(self.buf) < end:
                break
            if ftype == 1 and size >= 4:
                cm = (int.from_bytes(self.buf[self.pos + 7:self.pos + 9], "big"),
                      int.from_bytes(self.buf[self.pos + 9:self.pos + 11], "big"))
                if cm == self.want:
                    return end - base
            self.pos = end
        if len(self.buf) > self.LIMIT:
            self.buf = bytearray()
            self.pos = 0
            self.want = (-1, -1)
        return None


class _Pair:
    def __init__(self, cr, cw, ur, uw):
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self._resume = asyncio.Event()
        self._resume.set()
        self._tasks = []
        # broker -> client bytes still allowed before holding (None: no limit)
        self._budget: Optional[int] = None
        self._scanner: Optional[_MethodScanner] = None
        self.holding = False

    def set_paused(self, paused: bool) -> None:
        if paused:
            self._resume.clear()
        else:
            # a release ends a hold too (and disarms a pending one)
            self._budget = None
            self._scanner = None
            self.holding = False
            self._resume.set()

    def hold_after(self, nbytes: int) -> None:
        self._scanner = None
        self._budget = max(0, nbytes)
        if self._budget == 0:
            self._hold()

    def hold_after_method(self, class_id: int, method_id: int) -> None:
        self._budget = None
        self._scanner = _MethodScanner(class_id, method_id)

    def _hold(self) -> None:
        self._budget = None
        self._scanner = None
        self.holding = True
        self._resume.clear()

    def abort(self) -> None:
        _abort(self.cw)
        _abort(self.uw)
        for t in self._tasks:
            t.cancel()

    def _allowed(self, data: bytes) -> int:
        """How much of `data` (broker -> client) may pass before a hold."""
        if self._scanner is not None:
            n = self._scanner.feed(data)
            if n is not None:
                self._scanner = None
                self._budget = n  # pass the matching frame, then hold
        if self._budget is None:
            return len(data)
        return min(self._budget, len(data))

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, from_broker: bool) -> None:
        try:
            while True:
                await self._resume.wait()
                data = await r.read(65536)
                if not data:
                    break
                scanned = False
                while data:
                    await self._resume.wait()
                    if from_broker:
                        if not scanned:
                            n = self._allowed(data)
                            scanned = True
                        else:
                            n = len(data) if self._budget is None else min(self._budget, len(data))
                        if self._budget is not None and self._budget == 0:
                            self._hold()  # keep the rest until released
                            continue
                        chunk, data = data[:n], data[n:]
                        if self._budget is not None:
                            self._budget -= len(chunk)
                    else:
                        chunk, data = data, b""
                    w.write(chunk)
                    await w.drain()
                    if from_broker and self._budget == 0:
                        self._hold()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.abort_half(w)

    def abort_half(self, w):
        try:
            w.close()
        except Exception:
            pass

    async def run(self) -> None:
        self._tasks = [asyncio.ensure_future(self._pipe(self.cr, self.uw, False)),
                       asyncio.ensure_future(self._pipe(self.ur, self.cw, True))]
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        # one side ended: tear the other down too
        for t in self._tasks:
            t.cancel()
        for w in (self.cw, self.uw):
            self.abort_half(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target_host")
    ap.add_argument("target_port", type=int)
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--cut-every", nargs=2, type=float, metavar=("MIN", "MAX"))
    a = ap.parse_args()
    p = TcpProxy(a.target_host, a.target_port, listen_port=a.listen_port).start()
    print("listening on 127.0.0.1:%d -> %s:%d" % (p.port, a.target_host, a.target_port), flush=True)
    if a.cut_every:
        p.start_random_cuts(*a.cut_every)
    try:
        while True:
            n = len(p.cuts)
            time.sleep(0.5)
            for t, k in p.cuts[n:]:
                print("%.3f cut %d connection(s)" % (t, k), flush=True)
    except KeyboardInterrupt:
        p.stop()


if __name__ == "__main__":
    main()
