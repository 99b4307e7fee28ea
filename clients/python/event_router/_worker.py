"""The worker: the protocol of docs/worker-protocol.md on one asyncio loop."""
import asyncio
import collections
import contextvars
import inspect
import json
import os
import signal
import stat
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

from . import _topics
from ._verdicts import (DELAY_MAX_MS, DeadLetter, Retry, _current, _State, clean_detail, clean_reason,
                        cut_text)

PROTOCOL = 1
MAX_EMIT_LINE = 16 * 1024 * 1024  # the daemon's limit for an answer with emits
_Task = asyncio.Task
_CACHE_MAX = 4096                 # event types are untrusted: bound the lookup cache
_MAX_THREADS = 64

_scan = json.JSONDecoder().scan_once
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ACK = b'{"type":"result","id":%d,"verdict":"ack"}\n'


def _log(text):
    try:
        sys.stderr.write("event_router: %s\n" % text)
        sys.stderr.flush()
    except Exception:
        pass


def _show(value, limit=200):
    """Untrusted text for a log line: escaped, bounded."""
    return ascii(value)[:limit]


def _describe(exc):
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception as e:
        text = "<str() raised %s>" % type(e).__name__
    return cut_text("%s: %s" % (name, text) if text else name)


def _parse(line):
    """json.loads for one protocol line, about twice as fast: the C scanner
    straight on the decoded text (json.loads also sniffs the encoding and
    strips whitespace on every call). Anything unusual takes json.loads."""
    try:
        text = line.decode("utf-8")
        obj, end = _scan(text, 0)
        if end == len(text):
            return obj
    except (UnicodeDecodeError, StopIteration, ValueError):
        pass
    return json.loads(line)


def _verdict_line(id, verdict, reason, detail, delay_ms=None):
    msg = {"type": "result", "id": id, "verdict": verdict, "reason": reason}
    if delay_ms is not None:
        msg["delay_ms"] = delay_ms
    if detail is not None:
        msg["detail"] = detail
    # Reason and detail are valid UTF-8 text already (cut_text, clean_reason).
    return (_dumps(msg) + "\n").encode("utf-8")


def _raised_line(id, verdict, exc, default_reason):
    """The answer for a Retry or DeadLetter, read again from the exception: a
    subclass may skip our __init__, a handler may change the attributes."""
    delay = getattr(exc, "delay_ms", None) if verdict == "retry" else None
    if type(delay) is not int or not 0 <= delay <= DELAY_MAX_MS:
        delay = None
    return _verdict_line(id, verdict, clean_reason(getattr(exc, "reason", None), default_reason),
                         clean_detail(getattr(exc, "detail", None)), delay)


class _Handler:
    __slots__ = ("words", "fn", "is_async", "name")

    def __init__(self, pattern, fn):
        self.words = _topics.compile_pattern(pattern)
        self.fn = fn
        call = getattr(fn, "__call__", None)
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        self.name = getattr(fn, "__qualname__", None) or type(fn).__name__


class Worker:
    """Runs handler functions behind event-router (a `worker:` handler).

    Register functions per event-type pattern, then call run()."""

    def __init__(self, *, threads=None):
        """threads: size of the pool that runs plain (non-async) functions;
        default: the daemon's concurrency for this process, at most 64."""
        self._handlers = []
        self._cache = {}
        self._threads = threads
        self.hello = None  # the daemon's hello message, once received

    def register_handler(self, pattern, fn):
        """Handle events whose type matches `pattern` ('*' one word, '#' zero
        or more) with `fn(event_data)`, async or plain. The first registered
        match wins."""
        if not callable(fn):
            raise TypeError("handler for %r is not callable: %r" % (pattern, fn))
        self._handlers.append(_Handler(pattern, fn))
        self._cache.clear()
        return fn

    def on(self, *patterns):
        """Decorator form of register_handler: @worker.on("speaker.*")."""
        if not patterns:
            raise TypeError("on() needs at least one event-type pattern")

        def register(fn):
            for p in patterns:
                self.register_handler(p, fn)
            return fn
        return register

    def handler_for(self, event_type):
        """The function that would handle `event_type`, or None."""
        h = self._lookup(event_type)
        return h.fn if h else None

    def _lookup(self, event_type):
        key = event_type if isinstance(event_type, str) else ""
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = None
        for h in self._handlers:
            if _topics.matches(h.words, key):
                found = h
                break
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = found
        return found

    def run(self):
        """Serve the daemon until it closes the input or sends SIGTERM, then
        return; exits with status 2 on a handshake failure, 1 if the daemon
        stops reading the answers."""
        # Before the loop exists: without the daemon's pipes, its own epoll
        # and self-pipe fds would take the numbers 3 and 4.
        fds = _protocol_fds()
        code = asyncio.run(self._serve(fds)) if fds else 2
        if code:
            sys.exit(code)

    async def serve(self):
        """run() for a caller that owns the loop; returns the exit status."""
        fds = _protocol_fds()
        return await self._serve(fds) if fds else 2

    async def _serve(self, fds):
        return await _Session(self, fds).serve()


class _Reader(asyncio.Protocol):
    def __init__(self, session):
        self.data_received = session._feed
        self._session = session

    def eof_received(self):
        self._session._input_ended()

    def connection_lost(self, exc):
        if exc is not None:
            _log("reading the events failed: %s" % exc)
        self._session._input_ended()


class _Writer(asyncio.BaseProtocol):
    def __init__(self, session):
        self._session = session
        self.closed = session._loop.create_future()

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        self._session._output_lost(exc)


def _env_fd(name, default):
    value = os.environ.get(name, default)
    try:
        fd = int(value)
        if fd >= 0:
            return fd
    except ValueError:
        pass
    raise ValueError("%s=%s is not a file descriptor" % (name, _show(value)))


def _protocol_fds():
    """(in, out) as the daemon passes them, or None after saying why not."""
    try:
        fds = _env_fd("ER_WORKER_IN_FD", 3), _env_fd("ER_WORKER_OUT_FD", 4)
        for fd in fds:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
                raise ValueError("fd %d is not a pipe" % fd)
            # Programs the handlers start must not hold or write the protocol pipes.
            os.set_inheritable(fd, False)
        return fds
    except (OSError, ValueError) as e:
        _log("%s: this program is an event-router worker (docs/worker-protocol.md); it reads "
             "events on fd 3 and answers on fd 4 (ER_WORKER_IN_FD / ER_WORKER_OUT_FD), "
             "both pipes" % e)
        return None


class _Session:
    """One run: the two pipes, the events in flight, the answers to write."""

    def __init__(self, worker, fds):
        self._worker = worker
        self._fds = fds
        self._loop = loop = asyncio.get_running_loop()
        self._lookup = worker._lookup
        self._inflight = {}          # protocol id -> Task
        self._limit = 1              # the hello's concurrency once it came
        self._ready = False
        self._partial = []           # the start of a line still arriving
        self._backlog = collections.deque()  # complete lines not yet taken
        self._paused = False
        self._taking = True          # False after SIGTERM
        self._ended = False          # input ended: finish what was sent
        self._out = []
        self._flush_pending = False
        self._out_closed = False
        self._rt = self._wt = self._writer = None
        self._executor = None
        self._handler_name = None
        self._unknown_types = set()
        self._done = loop.create_future()

    async def serve(self):
        in_fd, out_fd = self._fds
        # stdout and stderr are pipes to the daemon's log: line by line, so a
        # print shows up when it happens, not a buffer later.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True)
            except Exception:
                pass
        loop = self._loop
        try:
            self._wt, self._writer = await loop.connect_write_pipe(
                lambda: _Writer(self), os.fdopen(out_fd, "wb", buffering=0))
            self._rt, _ = await loop.connect_read_pipe(
                lambda: _Reader(self), os.fdopen(in_fd, "rb", buffering=0))
        except (OSError, ValueError) as e:
            _log("cannot use fd %d/%d as the protocol pipes: %s" % (in_fd, out_fd, e))
            return 2
        try:
            loop.add_signal_handler(signal.SIGTERM, self._sigterm)
            on_sigterm = True
        except (ValueError, RuntimeError) as e:  # serve() outside the main thread
            _log("SIGTERM will not drain the events in flight: %s" % e)
            on_sigterm = False
        try:
            code = await self._done
        finally:
            if on_sigterm:
                loop.remove_signal_handler(signal.SIGTERM)
            self._rt.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
        self._flush()
        if not self._out_closed:
            self._wt.close()  # after the buffered answers are written
            await self._writer.closed
        return code

    # --- input ---------------------------------------------------------------
    def _feed(self, data):
        lines = data.split(b"\n")
        if self._partial:
            self._partial.append(lines[0])
            if len(lines) == 1:
                return
            lines[0] = b"".join(self._partial)
            self._partial = []
        tail = lines.pop()
        if tail:
            self._partial.append(tail)
        if (self._backlog or not self._ready or not self._taking
                or len(self._inflight) + len(lines) > self._limit):
            self._backlog.extend(lines)
            self._pump()
            return
        line_ = self._line
        for line in lines:
            if line:
                line_(line)

    def _pump(self):
        backlog = self._backlog
        while backlog and self._taking and len(self._inflight) < self._limit:
            line = backlog.popleft()
            if line:
                self._line(line)
        if not self._taking:
            backlog.clear()
        if backlog and not self._paused:
            self._paused = True
            self._rt.pause_reading()
        elif not backlog and self._paused and self._taking:
            self._paused = False
            self._rt.resume_reading()
        self._maybe_finish()

    def _line(self, line):
        try:
            msg = _parse(line)
        except ValueError as e:
            _log("ignored a line that is not JSON (%s): %s" % (e, _show(line[:100])))
            return
        if type(msg) is not dict:
            _log("ignored a message that is not an object: %s" % _show(line[:100]))
            return
        if not self._ready:
            self._hello(msg)
        elif msg.get("type") == "event":
            self._event(msg)
        else:
            t = msg.get("type")
            key = t if isinstance(t, str) else repr(type(t))
            if key not in self._unknown_types and len(self._unknown_types) < 100:
                self._unknown_types.add(key)
                _log("ignored messages of type %s (later protocol versions may add some)" % _show(t))

    def _hello(self, msg):
        if msg.get("type") != "hello":
            _log("expected a hello as the first message, got type %s" % _show(msg.get("type")))
            self._finish(2)
            return
        self._worker.hello = msg
        self._write(b'{"type":"ready","protocol":1}\n')
        version = msg.get("protocol")
        if type(version) is not int or version != PROTOCOL:
            _log("the daemon speaks worker protocol %s, this helper (clients/python) speaks %d: "
                 "use the event_router package that comes with the daemon" % (_show(version), PROTOCOL))
            self._finish(2)
            return
        conc = msg.get("concurrency")
        if type(conc) is int and conc >= 1:
            self._limit = conc
        else:
            _log("the hello has no valid concurrency (%s): taking one event at a time" % _show(conc))
        name = msg.get("handler")
        self._handler_name = name if isinstance(name, str) else None
        threads = self._worker._threads or min(self._limit, _MAX_THREADS)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="event_router")
        self._ready = True
        if not self._worker._handlers:
            _log("no handler registered: every event will be dead-lettered (no_handler)")

    def _event(self, msg):
        id = msg.get("id")
        if type(id) is not int or id <= 0:
            _log("ignored an event with an invalid id %s" % _show(id))
            return
        if id in self._inflight:
            _log("ignored event %d: that id is already in flight" % id)
            return
        event_type = msg.get("event_type")
        h = self._lookup(event_type)
        if h is None:
            self._write(_verdict_line(id, "dead_letter", "no_handler",
                                      cut_text("no handler for event type %s" % _show(event_type, 300))))
            return
        # Task() rather than loop.create_task(): one Python frame less per event.
        self._inflight[id] = _Task(self._run(h, msg.get("event"), _State(id, msg, self._handler_name)),
                                   loop=self._loop)

    def _input_ended(self):
        if not self._ended:
            self._ended = True
            if self._partial:
                _log("ignored an unterminated last line (%d bytes)" % sum(map(len, self._partial)))
                self._partial = []
            self._maybe_finish()

    def _sigterm(self):
        if self._taking:
            self._taking = False
            left = sum(1 for line in self._backlog if line)
            _log("SIGTERM: finishing %d event(s) in flight%s" % (
                len(self._inflight), ", not taking %d received" % left if left else ""))
            self._backlog.clear()
            if not self._paused and self._rt is not None:
                self._paused = True
                self._rt.pause_reading()
            self._maybe_finish()

    def _maybe_finish(self):
        if (self._ended or not self._taking) and not self._inflight and not self._backlog:
            self._finish(0)

    def _finish(self, code):
        self._taking = False
        if not self._done.done():
            self._done.set_result(code)

    # --- handling ------------------------------------------------------------
    async def _run(self, h, event, state):
        _current.set(state)
        try:
            if h.is_async:
                await h.fn(event)
            else:
                result = await self._loop.run_in_executor(
                    self._executor, contextvars.copy_context().run, h.fn, event)
                if inspect.isawaitable(result):
                    await result
        except Retry as e:
            line = _raised_line(state.id, "retry", e, "handler_failed")
        except DeadLetter as e:
            line = _raised_line(state.id, "dead_letter", e, "handler_rejected")
        except BaseException as e:  # even SystemExit: one event never ends the others
            line = _verdict_line(state.id, "retry", "handler_failed", _describe(e))
            if not self._out_closed:  # else: cancelled at exit, nobody to answer
                self._log_failure(h, state, e)
        else:
            line = _ACK % state.id if state.emits is None else self._ack_with_emits(state)
        state.answered = True
        del self._inflight[state.id]
        self._write(line)
        if self._backlog:
            self._pump()
        elif self._ended or not self._taking:
            self._maybe_finish()

    @staticmethod
    def _ack_with_emits(state):
        emits = state.emits
        line = b'{"type":"result","id":%d,"verdict":"ack","emit":[%b]}\n' % (state.id, b",".join(emits))
        if len(line) > MAX_EMIT_LINE:
            # The daemon would call the line a protocol error and retry it
            # forever: the same handler emits as much next time.
            return _verdict_line(state.id, "dead_letter", "emit_too_large",
                                 "%d emitted events, %d bytes: over the %d-byte limit of an answer"
                                 % (len(emits), len(line), MAX_EMIT_LINE))
        return line

    @staticmethod
    def _log_failure(h, state, exc):
        try:
            tb = "".join(traceback.format_exception(exc))
        except Exception as e:
            tb = "(no traceback: %s)\n" % type(e).__name__
        _log("handler %s failed on event %s (type %s, attempt %s), to be retried:\n%s" % (
            h.name, _show(state.msg.get("event_id"), 140), _show(state.msg.get("event_type"), 140),
            _show(state.msg.get("attempt"), 20), tb.rstrip("\n")))

    # --- output --------------------------------------------------------------
    def _write(self, data):
        if self._out_closed:
            return
        self._out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self):
        # One write for every answer of a loop iteration.
        self._flush_pending = False
        if self._out and not self._out_closed:
            data = b"".join(self._out)
            self._out.clear()
            self._wt.write(data)

    def _output_lost(self, exc):
        if not self._out_closed:
            self._out_closed = True
            if not self._done.done():
                _log("the daemon stopped reading the answers (%s): exiting" % (exc or "closed"))
                self._finish(1)
