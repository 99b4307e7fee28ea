"""Verdict exceptions, the per-event context, emit() and current()."""
import contextvars
import datetime
import json
import math
import re
from dataclasses import dataclass

DETAIL_MAX = 1024          # bytes of UTF-8, as the protocol cuts them
REASON_MAX = 64
_REASON_BAD = re.compile(r"[^A-Za-z0-9_.-]")
DELAY_MAX_MS = 2**31 - 1  # ~24.8 days: past any retry step

# allow_nan=False: NaN is not JSON; the daemon would call the answer garbage.
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def cut_text(text, limit=DETAIL_MAX):
    """`text` as valid UTF-8 of at most `limit` bytes (lone surrogates become '?')."""
    text = text[:limit]  # a char is at least one byte: never cuts too much
    data = text.encode("utf-8", "replace")
    if len(data) > limit:
        data = data[:limit]
    return data.decode("utf-8", "ignore")  # drops a character cut in half


def clean_reason(reason, default):
    """A reason code as the protocol allows it ([A-Za-z0-9_.-], at most 64
    bytes): other characters become '_', so a verdict is never lost to a typo."""
    if reason is None:
        return default
    try:
        reason = _REASON_BAD.sub("_", reason if isinstance(reason, str) else str(reason))[:REASON_MAX]
    except Exception:  # a reason object whose str() fails
        return default
    return reason or default


def clean_detail(detail):
    if detail is None:
        return None
    try:
        text = detail if isinstance(detail, str) else str(detail)
    except Exception as e:  # a detail object whose str() fails
        text = "<str() of %s raised %s>" % (type(detail).__name__, type(e).__name__)
    return cut_text(text)


def delay_ms(after):
    if after is None:
        return None
    if isinstance(after, datetime.timedelta):
        seconds = after.total_seconds()
    elif isinstance(after, (int, float)) and not isinstance(after, bool):
        seconds = float(after)
    else:
        raise TypeError("Retry(after=...) takes seconds or a timedelta, got %r" % (after,))
    if math.isnan(seconds):
        return None
    # Rounded up: `after` is the least wait.
    return int(min(max(math.ceil(seconds * 1000), 0), DELAY_MAX_MS))


class Retry(Exception):
    """Raise to retry the event: `after` (seconds or a timedelta) is the least
    wait before the next attempt."""

    def __init__(self, after=None, reason=None, detail=None):
        self.delay_ms = delay_ms(after)
        self.reason = clean_reason(reason, "handler_failed")
        self.detail = clean_detail(detail)
        super().__init__(after, reason, detail)

    def __str__(self):
        return "retry (%s)%s" % (self.reason, ": " + self.detail if self.detail else "")


class DeadLetter(Exception):
    """Raise to dead-letter the event at once, with a reason code."""

    def __init__(self, reason=None, detail=None):
        self.reason = clean_reason(reason, "handler_rejected")
        self.detail = clean_detail(detail)
        super().__init__(reason, detail)

    def __str__(self):
        return "dead letter (%s)%s" % (self.reason, ": " + self.detail if self.detail else "")


@dataclass(frozen=True, slots=True)
class EventContext:
    """The metadata of the event being handled (docs/worker-protocol.md).
    All but `id` and `handler` come from the publisher: untrusted."""
    id: int                 # the protocol id, unique within this process
    handler: str            # the handler's name in the daemon's config
    event_type: object
    event_id: object
    aggregate_id: object
    aggregate_type: object
    correlation_id: object
    routing_key: object
    exchange: object
    queue: object
    attempt: object
    redelivered: object


class _State:
    """One event in flight: what emit() and current() reach through the context."""
    __slots__ = ("id", "msg", "handler", "emits", "answered", "context")

    def __init__(self, id, msg, handler):
        self.id = id
        self.msg = msg
        self.handler = handler
        self.emits = None
        self.answered = False
        self.context = None


_current = contextvars.ContextVar("event_router_event")


def _state(what):
    state = _current.get(None)
    if state is None:
        raise RuntimeError("event_router.%s() is only available while a handler runs" % what)
    return state


def current():
    """The EventContext of the event this handler (or a task it started) runs for."""
    state = _state("current")
    ctx = state.context
    if ctx is None:
        g = state.msg.get
        ctx = state.context = EventContext(
            state.id, state.handler, g("event_type"), g("event_id"), g("aggregate_id"),
            g("aggregate_type"), g("correlation_id"), g("routing_key"), g("exchange"),
            g("queue"), g("attempt"), g("redelivered"))
    return ctx


def emit(event_type, payload=None, *, aggregate_id=None, aggregate_type=None, routing_key=None):
    """Publish a follow-up event with this event's ack (dropped with any other
    verdict). The daemon fills the envelope. Serialised now, so bad payloads
    raise here, in the handler, and later changes to `payload` do not count."""
    state = _state("emit")
    if state.answered:
        raise RuntimeError("event_router.emit(): event %d is already answered" % state.id)
    if not isinstance(event_type, str) or not event_type:
        raise TypeError("emit(): event_type must be a non-empty string, got %r" % (event_type,))
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise TypeError("emit(): payload must be a dict (a JSON object), got %s" % type(payload).__name__)
    obj = {"event_type": event_type, "payload": payload}
    for key, value in (("aggregate_id", aggregate_id), ("aggregate_type", aggregate_type),
                       ("routing_key", routing_key)):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError("emit(): %s must be a string, got %s" % (key, type(value).__name__))
            obj[key] = value
    try:
        fragment = _dumps(obj).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("emit(): the event holds a lone surrogate, not valid UTF-8 (%s)" % e) from None
    if state.emits is None:
        state.emits = [fragment]
    else:
        state.emits.append(fragment)
