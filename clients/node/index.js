'use strict';
// @event-router/worker: runs event handlers written for an amqplib consumer
// (`async (eventData) => {...}`, throw to retry) as an event-router worker.
// The contract is docs/worker-protocol.md (version 1): JSON lines in on fd 3,
// JSON lines out on fd 4, so nothing a handler prints can corrupt them.
// No runtime dependencies; CommonJS so `require` finds it in node's global
// folders (ESM `import` does not look there: see README).

const fs = require('fs');
const net = require('net');
const util = require('util');

const PROTOCOL_VERSION = 1;
const DETAIL_MAX = 1024;             // bytes, as the daemon cuts it
const REASON_MAX = 64;
const EMIT_LINE_MAX = 16 * 1024 * 1024;  // an answer with emits, the daemon's limit
const VERDICT = Symbol.for('event-router.worker.verdict');  // brand: survives two copies of this module

class Retry extends Error {
  constructor(options) {
    const o = options == null ? {} : options;
    super(o.detail != null ? String(o.detail) : 'retry');
    this.name = 'Retry';
    // `after` is validated when the answer is written, so a bad value
    // still retries (without a delay) instead of changing the verdict.
    this.after = o.after;
    this.reason = o.reason != null ? String(o.reason) : 'handler_failed';
    this.detail = o.detail != null ? String(o.detail) : undefined;
  }
}
Object.defineProperty(Retry.prototype, VERDICT, { value: 'retry' });

class DeadLetter extends Error {
  constructor(reason, detail) {
    super(detail != null ? String(detail) : (reason != null ? String(reason) : 'dead_letter'));
    this.name = 'DeadLetter';
    this.reason = reason != null ? String(reason) : 'handler_rejected';
    this.detail = detail != null ? String(detail) : undefined;
  }
}
Object.defineProperty(DeadLetter.prototype, VERDICT, { value: 'dead_letter' });

// --- answer encoding ---------------------------------------------------------

// Cuts a string to at most `max` UTF-8 bytes without splitting a character.
function cutUtf8(s, max) {
  if (s.length * 3 <= max) return s;
  const b = Buffer.from(s, 'utf8');
  if (b.length <= max) return s;
  let n = max;
  while (n > 0 && (b[n] & 0xc0) === 0x80) n--;
  return b.toString('utf8', 0, n);
}

// The daemon takes [A-Za-z0-9_.-]{1,64}; anything else becomes '_' so that a
// typo in a reason keeps the verdict the handler chose.
function cleanReason(r, dflt) {
  if (typeof r !== 'string' || r.length === 0) return dflt;
  return r.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, REASON_MAX);
}

// `Name: message` for an Error, the text for a string, else what
// util.inspect makes of it. Never throws (getters and proxies may).
function describe(e) {
  try {
    if (typeof e === 'string') return e;
    if (e instanceof Error || util.types.isNativeError(e)) return `${e.name}: ${e.message}`;
  } catch (_) { /* a throwing getter: fall through */ }
  try {
    return util.inspect(e, { depth: 2, breakLength: Infinity });
  } catch (_) {
    return 'a value that cannot be printed';
  }
}

function stackOf(e) {
  try {
    if (e != null && typeof e.stack === 'string') return e.stack;
  } catch (_) { /* ignore */ }
  return describe(e);
}

function brandOf(e) {
  try {
    return e != null && (typeof e === 'object' || typeof e === 'function') ? e[VERDICT] : undefined;
  } catch (_) {
    return undefined;
  }
}

function field(e, name) {
  try { return e[name]; } catch (_) { return undefined; }
}

function detailPart(d) {
  return d == null ? '' : ',"detail":' + JSON.stringify(cutUtf8(String(d), DETAIL_MAX));
}

function retryLine(id, reason, detail, after) {
  let delay = '';
  if (typeof after === 'number' && after > 0) {
    delay = ',"delay_ms":' + (Number.isFinite(after) ? Math.ceil(after) : Number.MAX_SAFE_INTEGER);
  }
  return '{"type":"result","id":' + id + ',"verdict":"retry"' + delay +
    ',"reason":"' + cleanReason(reason, 'handler_failed') + '"' + detailPart(detail) + '}\n';
}

function deadLetterLine(id, reason, detail) {
  return '{"type":"result","id":' + id + ',"verdict":"dead_letter","reason":"' +
    cleanReason(reason, 'handler_rejected') + '"' + detailPart(detail) + '}\n';
}

// --- topic patterns ----------------------------------------------------------

// RabbitMQ topic matching on dot-separated words: `*` one word, `#` zero or more.
function topicMatch(p, pi, w, wi) {
  while (pi < p.length) {
    const t = p[pi];
    if (t === '#') {
      if (pi === p.length - 1) return true;
      for (let k = wi; k <= w.length; k++) if (topicMatch(p, pi + 1, w, k)) return true;
      return false;
    }
    if (wi >= w.length || (t !== '*' && t !== w[wi])) return false;
    pi++; wi++;
  }
  return wi === w.length;
}

// --- per-event context -------------------------------------------------------

const EMIT_OPTIONS = new Set(['aggregateId', 'aggregateType', 'routingKey']);

function optString(opts, key) {
  const v = opts[key];
  if (v == null) return '';
  if (typeof v !== 'string') throw new TypeError(`ctx.emit: ${key} must be a string`);
  return ',"' + (key === 'aggregateId' ? 'aggregate_id' : key === 'aggregateType' ? 'aggregate_type' : 'routing_key') +
    '":' + JSON.stringify(v);
}

class EventContext {
  constructor(m, handler) {
    this.id = m.id;
    this.eventType = m.event_type ?? null;
    this.eventId = m.event_id ?? null;
    this.aggregateId = m.aggregate_id ?? null;
    this.aggregateType = m.aggregate_type ?? null;
    this.correlationId = m.correlation_id ?? null;
    this.routingKey = m.routing_key ?? null;
    this.exchange = m.exchange ?? null;
    this.queue = m.queue ?? null;
    this.attempt = m.attempt ?? null;
    this.redelivered = m.redelivered ?? null;
    this.handler = handler;
    this._emits = null;    // serialised emit elements, sent with an ack
    this._answered = false;
  }

  // Serialises now: a payload that cannot be JSON throws here, in the
  // handler, and later changes to the object do not leak into the event.
  emit(eventType, payload, options) {
    if (this._answered) throw new Error('ctx.emit() after the event was answered (emit before the handler returns)');
    if (typeof eventType !== 'string' || eventType.length === 0) {
      throw new TypeError('ctx.emit: eventType must be a non-empty string');
    }
    let body = '{"event_type":' + JSON.stringify(eventType);
    if (payload !== undefined) {
      if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
        throw new TypeError('ctx.emit: payload must be a JSON object');
      }
      const p = JSON.stringify(payload);
      if (typeof p !== 'string' || p[0] !== '{') throw new TypeError('ctx.emit: payload must serialise to a JSON object');
      body += ',"payload":' + p;
    }
    if (options != null) {
      if (typeof options !== 'object') throw new TypeError('ctx.emit: options must be an object');
      for (const k of Object.keys(options)) {
        if (!EMIT_OPTIONS.has(k)) {
          throw new TypeError(`ctx.emit: unknown option '${k}' (aggregateId, aggregateType, routingKey)`);
        }
      }
      body += optString(options, 'aggregateId') + optString(options, 'aggregateType') + optString(options, 'routingKey');
    }
    (this._emits || (this._emits = [])).push(body + '}');
  }
}

// --- the worker --------------------------------------------------------------

function envFd(name, dflt) {
  const v = process.env[name];
  if (v === undefined || v === '') return dflt;
  if (!/^[0-9]+$/.test(v)) throw new Error(`${name}=${v} is not a file descriptor number`);
  return Number(v);
}

function isChannel(fd) {
  let st;
  try {
    st = fs.fstatSync(fd);
  } catch (_) {
    return false;
  }
  return st.isFIFO() || st.isSocket() || st.isFile();
}

// A pipe or socket as a non-blocking stream (libuv); a regular file (a
// replayed capture) through the fs streams.
function openStream(fd, readable) {
  try {
    return new net.Socket({ fd, readable, writable: !readable, allowHalfOpen: true });
  } catch (e) {
    if (e && e.code === 'ERR_INVALID_FD_TYPE') {
      return readable ? fs.createReadStream(null, { fd, highWaterMark: 65536 }) : fs.createWriteStream(null, { fd });
    }
    throw e;
  }
}

function fatal(message, code) {
  process.stderr.write(`event-router worker: ${message}\n`, () => process.exit(code));
  setTimeout(() => process.exit(code), 1000).unref();
}

class Worker {
  constructor() {
    this._routes = [];          // [{pattern, words, fn}] in registration order
    this._cache = new Map();    // subject -> route or null
    this._shutdownHooks = [];
    this._started = false;
    this._in = null;
    this._out = null;
    this._hello = null;
    this._concurrency = Infinity;
    this._inFlight = 0;
    this._waiting = [];         // events beyond hello's concurrency
    this._startingWaiting = false;
    this._pending = '';         // answers not yet written (flushed once per tick)
    this._flushQueued = false;
    this._blocked = false;      // output full: input paused until 'drain'
    this._stopping = false;     // end of input or SIGTERM: no new events
    this._exiting = false;
    this._carry = '';
    this._ignored = new Set();  // message types said on stderr
  }

  /** The hello message once started ({handler, queue, concurrency, ...}). */
  get hello() { return this._hello; }

  registerHandler(pattern, fn) {
    if (typeof pattern !== 'string' || pattern.length === 0) throw new TypeError('registerHandler: pattern must be a non-empty string');
    if (typeof fn !== 'function') throw new TypeError('registerHandler: handler must be a function');
    this._routes.push({ pattern, words: pattern.split('.'), fn });
    this._cache.clear();
    return this;
  }

  /** Runs after the last answer is written, before the process exits. */
  onShutdown(fn) {
    if (typeof fn !== 'function') throw new TypeError('onShutdown: argument must be a function');
    this._shutdownHooks.push(fn);
    return this;
  }

  _route(subject) {
    let r = this._cache.get(subject);
    if (r !== undefined) return r;
    r = null;
    const words = subject.split('.');
    for (const route of this._routes) {
      if (topicMatch(route.words, 0, words, 0)) { r = route; break; }
    }
    if (this._cache.size >= 1024) this._cache.clear();  // subjects come from publishers
    this._cache.set(subject, r);
    return r;
  }

  /** Handshake on fds ER_WORKER_IN_FD/ER_WORKER_OUT_FD (3/4); resolves once ready is sent. */
  start() {
    if (this._started) return Promise.reject(new Error('worker already started'));
    this._started = true;
    let inFd, outFd;
    try {
      inFd = envFd('ER_WORKER_IN_FD', 3);
      outFd = envFd('ER_WORKER_OUT_FD', 4);
      // Run by hand, fd 3 may be node's own epoll descriptor: only a pipe,
      // a socket or a file is the daemon's.
      if (!isChannel(inFd) || !isChannel(outFd)) {
        fatal(`fd ${inFd}/${outFd} not a pipe: this program is an event-router worker ` +
          '(docs/worker-protocol.md), started by the daemon for a handler with `worker:`', 2);
        return new Promise(() => {});
      }
    } catch (e) {
      fatal(describe(e), 2);
      return new Promise(() => {});
    }
    this._in = openStream(inFd, true);
    this._out = openStream(outFd, false);
    this._out.on('error', (e) => fatal(`writing answers failed: ${describe(e)}`, 1));
    this._in.on('error', (e) => fatal(`reading events failed: ${describe(e)}`, 1));
    this._in.setEncoding('utf8');

    const onSignal = () => {
      if (this._stopping) { fatal('second signal: exiting with events in flight', 1); return; }
      this._stopping = true;
      this._in.pause();
      this._maybeExit();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);

    return new Promise((resolve) => {
      this._onReady = resolve;
      this._in.on('data', (chunk) => this._onData(chunk));
      this._in.on('end', () => {
        this._stopping = true;
        if (this._carry.length > 0) process.stderr.write('event-router worker: input ended inside a line; ignored\n');
        if (this._hello === null) { fatal('end of input before hello', 0); return; }
        this._maybeExit();
      });
    });
  }

  _onData(chunk) {
    let start = 0;
    let nl = chunk.indexOf('\n');
    if (nl === -1) { this._carry += chunk; return; }
    if (this._carry.length > 0) {
      const line = this._carry + chunk.slice(0, nl);
      this._carry = '';
      this._onLine(line);
      start = nl + 1;
      nl = chunk.indexOf('\n', start);
    }
    while (nl !== -1) {
      if (nl > start) this._onLine(chunk.slice(start, nl));
      start = nl + 1;
      nl = chunk.indexOf('\n', start);
    }
    if (start < chunk.length) this._carry = chunk.slice(start);
  }

  _onLine(line) {
    if (this._exiting) return;
    let m;
    try {
      m = JSON.parse(line);
    } catch (e) {
      fatal(`protocol error: a line from the daemon is not JSON (${describe(e)})`, 1);
      this._exiting = true;
      return;
    }
    if (m === null || typeof m !== 'object') {
      fatal('protocol error: a message from the daemon is not a JSON object', 1);
      this._exiting = true;
      return;
    }
    if (m.type === 'event') {
      if (this._hello === null) { this._protocolError('an event before hello'); return; }
      if (!Number.isSafeInteger(m.id) || m.id <= 0) { this._protocolError('an event without a positive integer id'); return; }
      if (this._stopping) {
        // Stopping (SIGTERM) while the daemon still sends: give it back now.
        this._answer(retryLine(m.id, 'worker_stopping', 'the worker is shutting down', undefined));
        return;
      }
      if (this._inFlight >= this._concurrency) { this._waiting.push(m); return; }
      this._run(m);
    } else if (m.type === 'hello') {
      this._onHello(m);
    } else {
      // Forward compatibility: later versions may add messages (said once a type).
      const type = JSON.stringify(String(m.type)).slice(0, 100);
      if (!this._ignored.has(type) && this._ignored.size < 100) {
        this._ignored.add(type);
        process.stderr.write(`event-router worker: ignoring messages of type ${type}\n`);
      }
    }
  }

  _protocolError(what) {
    this._exiting = true;
    fatal(`protocol error: ${what}`, 1);
  }

  _onHello(m) {
    if (this._hello !== null) { this._protocolError('a second hello'); return; }
    this._hello = m;
    this._write('{"type":"ready","protocol":' + PROTOCOL_VERSION + '}\n');
    if (m.protocol !== PROTOCOL_VERSION) {
      this._exiting = true;
      this._in.pause();
      const msg = `the daemon speaks protocol ${JSON.stringify(m.protocol)}, this helper (@event-router/worker) speaks ${PROTOCOL_VERSION}`;
      this._out.end(() => fatal(msg, 3));
      return;
    }
    if (Number.isSafeInteger(m.concurrency) && m.concurrency > 0) this._concurrency = m.concurrency;
    const resolve = this._onReady;
    this._onReady = null;
    resolve();
  }

  _run(m) {
    this._inFlight++;
    const subject = typeof m.event_type === 'string' ? m.event_type
      : typeof m.routing_key === 'string' ? m.routing_key : null;
    const route = subject === null ? null : this._route(subject);
    const ctx = new EventContext(m, this._hello.handler ?? null);
    if (route === null) {
      this._settle(ctx, deadLetterLine(m.id, 'no_handler',
        `no handler registered for event type ${JSON.stringify(subject)}`));
      return;
    }
    const fn = route.fn;  // a plain call, not a method call on our route record
    let r;
    try {
      r = fn(m.event, ctx);
    } catch (e) {
      this._failed(ctx, e);
      return;
    }
    if (r !== null && (typeof r === 'object' || typeof r === 'function') && typeof r.then === 'function') {
      let settled = false;
      try {
        r.then(() => { if (!settled) { settled = true; this._acked(ctx); } },
          (e) => { if (!settled) { settled = true; this._failed(ctx, e); } });
      } catch (e) {
        if (!settled) { settled = true; this._failed(ctx, e); }
      }
    } else {
      this._acked(ctx);
    }
  }

  _acked(ctx) {
    const emits = ctx._emits;
    if (emits === null) {
      this._settle(ctx, '{"type":"result","id":' + ctx.id + ',"verdict":"ack"}\n');
      return;
    }
    const line = '{"type":"result","id":' + ctx.id + ',"verdict":"ack","emit":[' + emits.join(',') + ']}\n';
    if (line.length > EMIT_LINE_MAX / 3 && Buffer.byteLength(line) > EMIT_LINE_MAX) {
      // The daemon would take it as a protocol error, and every retry would
      // do the same: dead-letter it instead, with the reason.
      this._settle(ctx, deadLetterLine(ctx.id, 'emit_too_large',
        `${emits.length} emitted events make a ${Buffer.byteLength(line)}-byte answer (limit ${EMIT_LINE_MAX})`));
      return;
    }
    this._settle(ctx, line);
  }

  _failed(ctx, e) {
    const brand = brandOf(e);
    let line;
    if (brand === 'retry') {
      line = retryLine(ctx.id, field(e, 'reason'), field(e, 'detail'), field(e, 'after'));
    } else if (brand === 'dead_letter') {
      line = deadLetterLine(ctx.id, field(e, 'reason'), field(e, 'detail'));
    } else {
      process.stderr.write(`event-router worker: handler for ${ctx.eventType} (event_id ${ctx.eventId}, attempt ${ctx.attempt}) failed: ${stackOf(e)}\n`);
      line = retryLine(ctx.id, 'handler_failed', describe(e), undefined);
    }
    if (ctx._emits !== null) {
      process.stderr.write(`event-router worker: ${ctx._emits.length} emitted event(s) of event_id ${ctx.eventId} dropped: emits go only with an ack\n`);
    }
    this._settle(ctx, line);
  }

  _settle(ctx, line) {
    ctx._answered = true;
    ctx._emits = null;
    this._inFlight--;
    this._answer(line);
    if (this._waiting.length > 0) this._startWaiting();
    else if (this._stopping) this._maybeExit();
  }

  // A loop, not a call per settle: synchronous handlers settle inside _run,
  // and a call each would nest once per waiting event.
  _startWaiting() {
    if (this._startingWaiting) return;
    this._startingWaiting = true;
    while (this._waiting.length > 0 && this._inFlight < this._concurrency) this._run(this._waiting.shift());
    this._startingWaiting = false;
    if (this._stopping) this._maybeExit();
  }

  // Answers finishing in the same tick go out in one write.
  _answer(line) {
    this._pending += line;
    if (!this._flushQueued) {
      this._flushQueued = true;
      process.nextTick(() => this._flush());
    }
  }

  _flush() {
    this._flushQueued = false;
    const data = this._pending;
    this._pending = '';
    if (data.length > 0) this._write(data);
  }

  _write(data) {
    if (!this._out.write(data) && !this._blocked) {
      this._blocked = true;
      this._in.pause();
      this._out.once('drain', () => {
        this._blocked = false;
        if (!this._stopping && !this._exiting) this._in.resume();
      });
    }
  }

  _maybeExit() {
    if (this._exiting || this._inFlight > 0 || this._waiting.length > 0) return;
    this._exiting = true;
    this._flush();
    this._out.end(async () => {
      for (const hook of this._shutdownHooks) {
        try {
          await hook();
        } catch (e) {
          process.stderr.write(`event-router worker: shutdown hook failed: ${stackOf(e)}\n`);
        }
      }
      process.exit(0);
    });
  }
}

exports.Worker = Worker;
exports.Retry = Retry;
exports.DeadLetter = DeadLetter;
exports.PROTOCOL_VERSION = PROTOCOL_VERSION;
exports.topicMatch = (pattern, subject) => topicMatch(pattern.split('.'), 0, subject.split('.'), 0);
