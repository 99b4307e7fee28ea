'use strict';
// Many events in flight in one process, up to hello's concurrency, each
// answered as it completes and each with its own emits.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

const WORKER = path.join(__dirname, '../fixtures/workers/concurrency.js');

test('32 events in flight at once; emits stay with their own event', async (t) => {
  const d = new FakeDaemon(WORKER);
  t.after(() => d.cleanup());
  d.hello({ concurrency: 32 });
  await d.waitFor(() => d.messages.length === 1, 'ready');
  const n = 32;
  const evs = [];
  for (let i = 0; i < n; i++) evs.push(eventMessage('c.barrier', { payload: { n: i, of: n } }));
  for (const ev of evs) d.send(ev);
  // Each handler waits until all n have started: they finish only if all are in flight together.
  const a = await d.answers(evs.map((e) => e.id));
  const seenAtStart = new Set();
  evs.forEach((ev, i) => {
    const r = a.get(ev.id);
    assert.strictEqual(r.verdict, 'ack');
    assert.strictEqual(r.emit.length, 1);
    assert.strictEqual(r.emit[0].payload.n, i, 'the emit of event i is in the answer to event i');
    assert.strictEqual(r.emit[0].payload.startedAtRelease, n);
    seenAtStart.add(r.emit[0].payload.seenAtStart);
  });
  assert.strictEqual(seenAtStart.size, n);
  // Answers come as handlers complete (random sleeps), not necessarily in order.
  assert.strictEqual(d.results().length, n);
});

test('no more than hello\'s concurrency at once, even if the daemon sends more', async (t) => {
  const d = new FakeDaemon(WORKER);
  t.after(() => d.cleanup());
  d.hello({ concurrency: 4 });
  await d.waitFor(() => d.messages.length === 1, 'ready');
  const evs = [];
  for (let i = 0; i < 12; i++) evs.push(eventMessage('c.limit', { payload: { n: i } }));
  for (const ev of evs) d.send(ev);
  const a = await d.answers(evs.map((e) => e.id));
  const most = Math.max(...evs.map((ev) => a.get(ev.id).emit[0].payload.most));
  assert.strictEqual(most, 4);
});

test('a long queue of waiting events with synchronous handlers: all answered (no deep recursion)', async (t) => {
  const d = new FakeDaemon(path.join(__dirname, '../fixtures/workers/verdicts.js'));
  t.after(() => d.cleanup());
  d.hello({ concurrency: 1 });
  await d.waitFor(() => d.messages.length === 1, 'ready');
  // The first holds the only slot until all the others are read and waiting.
  const evs = [eventMessage('t.slow', { payload: { ms: 1500 } })];
  for (let i = 0; i < 20000; i++) evs.push(eventMessage('t.sync_ok'));
  d.sendRaw(evs.map((e) => JSON.stringify(e) + '\n').join(''));
  const a = await d.answers(evs.map((e) => e.id), 30000);
  assert.strictEqual([...a.values()].filter((r) => r.verdict === 'ack').length, evs.length);
});
