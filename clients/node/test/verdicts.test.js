'use strict';
// Every verdict, every kind of throw, ctx and emit, against one worker.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

let d;
test.before(async () => {
  d = new FakeDaemon(path.join(__dirname, '../fixtures/workers/verdicts.js'));
  await d.ready();
});
test.after(() => d.cleanup());

// Sends one event, returns its answer.
async function answer(eventType, body, meta) {
  const ev = eventMessage(eventType, body, meta);
  d.send(ev);
  return (await d.answers([ev.id])).get(ev.id);
}

test('resolving (async or plain function) acks', async () => {
  for (const t of ['t.ack', 't.sync_ok']) {
    const a = await answer(t);
    assert.deepStrictEqual(Object.keys(a).sort(), ['id', 'type', 'verdict']);
    assert.strictEqual(a.verdict, 'ack', t);
  }
});

test('Retry({after, reason, detail}) -> retry with delay_ms, reason and detail', async () => {
  const a = await answer('t.retry_after', { payload: { after: 1500 } });
  assert.strictEqual(a.verdict, 'retry');
  assert.strictEqual(a.delay_ms, 1500);
  assert.strictEqual(a.reason, 'db_down');
  assert.strictEqual(a.detail, 'connection refused');
  assert.strictEqual((await answer('t.retry_after', { payload: { after: 0.2 } })).delay_ms, 1, 'rounded up to whole ms');
  for (const after of [0, -5, 'soon', null]) {
    const b = await answer('t.retry_after', { payload: { after } });
    assert.strictEqual(b.verdict, 'retry');
    assert.ok(!('delay_ms' in b), `after=${JSON.stringify(after)}: no delay_ms`);
  }
  const c = await answer('t.retry_plain');
  assert.deepStrictEqual([c.verdict, c.reason, c.delay_ms, c.detail], ['retry', 'handler_failed', undefined, undefined]);
});

test('DeadLetter(reason, detail) -> dead_letter; defaults and unsafe reasons', async () => {
  const a = await answer('t.dead');
  assert.deepStrictEqual(a, { type: 'result', id: a.id, verdict: 'dead_letter', reason: 'bad_payload', detail: 'speaker_id missing' });
  const b = await answer('t.dead_plain');
  assert.deepStrictEqual([b.verdict, b.reason], ['dead_letter', 'handler_rejected']);
  const c = await answer('t.bad_reason');
  assert.strictEqual(c.verdict, 'dead_letter', 'an unsafe reason keeps the verdict');
  assert.match(c.reason, /^[A-Za-z0-9_.-]{1,64}$/);
  assert.strictEqual(c.reason, 'bad_payload___x__');
});

test('any other throw or rejection -> retry handler_failed, detail "Name: message"', async () => {
  const cases = {
    't.throw_error': 'TypeError: boom',
    't.sync_throw': 'RangeError: sync boom',
    't.reject': 'Error: rejected',
    't.bad_thenable': 'Error: then throws',
  };
  for (const [t, detail] of Object.entries(cases)) {
    const a = await answer(t);
    assert.deepStrictEqual([a.verdict, a.reason, a.detail], ['retry', 'handler_failed', detail], t);
  }
  assert.match(d.stderr, /handler for t\.throw_error .*failed: TypeError: boom\n\s+at /, 'the stack goes to stderr');
});

test('throwing non-Error values: strings, null, undefined, throwing getters, proxies', async () => {
  const expect = {
    't.throw_string': (x) => x === 'plain string',
    't.throw_null': (x) => x === 'null',
    't.throw_undefined': (x) => x === 'undefined',
    't.throw_getters': (x) => /\[Getter\]/.test(x),
    't.throw_error_getter': (x) => x === 'a value that cannot be printed',
    't.throw_proxy': (x) => typeof x === 'string' && x.length > 0,
  };
  for (const [t, ok] of Object.entries(expect)) {
    const a = await answer(t);
    assert.deepStrictEqual([a.verdict, a.reason], ['retry', 'handler_failed'], t);
    assert.ok(ok(a.detail), `${t}: detail ${JSON.stringify(a.detail)}`);
  }
  assert.strictEqual((await answer('t.ack')).verdict, 'ack', 'the worker lives on');
});

test('detail is cut at 1 KiB of UTF-8 without splitting a character', async () => {
  const a = await answer('t.long_detail');
  const bytes = Buffer.byteLength(a.detail);
  assert.ok(bytes <= 1024 && bytes >= 1020, `${bytes} bytes`);
  assert.ok(a.detail.startsWith('Error: éé'));
  assert.ok(!a.detail.includes('\ufffd'));
});

test('no handler for the event type -> dead_letter no_handler', async () => {
  const a = await answer('nobody.listens');
  assert.strictEqual(a.verdict, 'dead_letter');
  assert.strictEqual(a.reason, 'no_handler');
  assert.match(a.detail, /nobody\.listens/);
  const b = await answer(null, {}, { routing_key: 'no.type' });
  assert.deepStrictEqual([b.verdict, b.reason], ['dead_letter', 'no_handler']);
});

test('the handler gets the event body and the metadata in ctx', async () => {
  const body = { eventId: 'e-1', eventType: 't.ctx', payload: { speaker_id: 's-1', nested: [1, { a: null }] } };
  const a = await answer('t.ctx', body, { attempt: 3, redelivered: true, correlation_id: null });
  assert.strictEqual(a.verdict, 'ack');
  assert.strictEqual(a.emit.length, 1);
  const seen = a.emit[0].payload;
  assert.deepStrictEqual(seen, {
    id: a.id, eventType: 't.ctx', eventId: `ev-${a.id}`, aggregateId: 'agg-1', aggregateType: 'Test',
    correlationId: null, routingKey: 't.ctx', exchange: 'test.exchange', queue: 'test.events',
    attempt: 3, redelivered: true, handler: 'test-worker', eventData: { event_type: 't.ctx', ...body },
  });
});

test('ctx.emit goes out with the ack, in the daemon\'s keys', async () => {
  const a = await answer('t.emit', { payload: { n: 7 } });
  assert.strictEqual(a.verdict, 'ack');
  assert.deepStrictEqual(a.emit, [
    { event_type: 'rag.dfn_generated', payload: { dfn: 'x', n: 7 }, aggregate_id: 'd-1', aggregate_type: 'Draft' },
    { event_type: 'rag.other', routing_key: 'rag.custom' },
  ]);
});

test('emits are dropped with a retry or dead_letter verdict (and said on stderr)', async () => {
  const a = await answer('t.emit_then_throw');
  assert.deepStrictEqual([a.verdict, a.detail, a.emit], ['retry', 'Error: after emit', undefined]);
  const b = await answer('t.emit_then_dead');
  assert.deepStrictEqual([b.verdict, b.reason, b.emit], ['dead_letter', 'nope', undefined]);
  assert.match(d.stderr, /1 emitted event\(s\) of event_id ev-\d+ dropped: emits go only with an ack/);
});

test('a bad emit throws in the handler: retry with the error', async () => {
  const big = await answer('t.emit_bigint');
  assert.deepStrictEqual([big.verdict, big.reason], ['retry', 'handler_failed']);
  assert.match(big.detail, /^TypeError: .*BigInt/);
  const arr = await answer('t.emit_array');
  assert.strictEqual(arr.detail, 'TypeError: ctx.emit: payload must be a JSON object');
  const opt = await answer('t.emit_bad_option');
  assert.match(opt.detail, /unknown option 'aggregate_id'/);
});

test('ctx.emit after the event is answered throws, nothing extra is sent', async () => {
  const before = d.results().length;
  const a = await answer('t.emit_late');
  assert.deepStrictEqual([a.verdict, a.emit], ['ack', undefined]);
  await d.waitFor(() => d.stdout.includes('late emit refused: ctx.emit() after the event was answered'), 'the late emit to throw');
  assert.strictEqual(d.results().length, before + 1);
});

test('an answer with emits over 16 MiB is dead-lettered (the daemon would refuse it)', async () => {
  const a = await answer('t.emit_huge');
  assert.strictEqual(a.verdict, 'dead_letter');
  assert.strictEqual(a.reason, 'emit_too_large');
  assert.match(a.detail, /17 emitted events make a \d+-byte answer \(limit 16777216\)/);
});
