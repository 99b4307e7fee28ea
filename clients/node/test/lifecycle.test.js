'use strict';
// What the handlers print, end of input, SIGTERM, a full output pipe.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

const LIFECYCLE = path.join(__dirname, '../fixtures/workers/lifecycle.js');

// A ready worker with three slow events running; returns the events.
async function threeRunning(d, ms) {
  await d.ready();
  const evs = [1, 2, 3].map((n) => eventMessage('l.slow', { payload: { n, ms } }));
  for (const ev of evs) d.send(ev);
  await d.waitFor(() => d.stdout.includes('slow 3 started'), 'all three started');
  return evs;
}

test('console.log and stdout writes inside a handler do not reach the protocol', async (t) => {
  const d = new FakeDaemon(LIFECYCLE);
  t.after(() => d.cleanup());
  await d.ready();
  const evs = [eventMessage('l.print', { payload: { p: 1 } }), eventMessage('l.slow', { payload: { n: 1, ms: 1 } })];
  for (const ev of evs) d.send(ev);
  const a = await d.answers(evs.map((e) => e.id));
  assert.strictEqual(a.get(evs[0].id).verdict, 'ack');
  assert.strictEqual(a.get(evs[1].id).verdict, 'ack');
  // Every line on fd 4 is ours (the harness parses each), and only ours.
  assert.deepStrictEqual(d.results().map((r) => r.id).sort(), evs.map((e) => e.id).sort());
  assert.ok(!d.raw.includes('999999'));
  await d.waitFor(() => d.stdout.includes('"id":999999') && d.stdout.includes("info { p: 1 }"), 'the prints on stdout');
  assert.match(d.stderr, /\{"type":"ready","protocol":2\}/);
});

test('end of input: in-flight events finish and are answered, shutdown hooks run, exit 0', async (t) => {
  const d = new FakeDaemon(LIFECYCLE);
  t.after(() => d.cleanup());
  const evs = await threeRunning(d, 300);
  d.closeInput();
  const { code, signal } = await d.exit;
  assert.deepStrictEqual({ code, signal }, { code: 0, signal: null });
  assert.deepStrictEqual(d.results().map((r) => [r.id, r.verdict]).sort(), evs.map((e) => [e.id, 'ack']));
  await d.waitFor(() => d.outputEnded, 'end of fd 4');
  assert.match(d.stdout, /slow 3 done[\s\S]*shutdown hook ran/);
});

test('end of input right after hello: exits 0', async (t) => {
  const d = new FakeDaemon(LIFECYCLE);
  t.after(() => d.cleanup());
  d.hello();
  d.closeInput();  // likely before node has even started
  const { code } = await d.exit;
  assert.strictEqual(code, 0);
  assert.deepStrictEqual(d.messages, [{ type: 'ready', protocol: 1 }]);
});

test('SIGTERM: no new events, in-flight ones finish and are answered, exit 0', async (t) => {
  const d = new FakeDaemon(LIFECYCLE);
  t.after(() => d.cleanup());
  const evs = await threeRunning(d, 400);
  d.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 100));
  const late = [4, 5].map((n) => eventMessage('l.slow', { payload: { n, ms: 1 } }));
  for (const ev of late) d.send(ev);
  const { code, signal } = await d.exit;   // fd 3 stays open: the signal alone ends it
  assert.deepStrictEqual({ code, signal }, { code: 0, signal: null });
  const answers = d.results().map((r) => [r.id, r.verdict]);
  assert.deepStrictEqual(answers.filter(([id]) => id <= evs[2].id).sort(), evs.map((e) => [e.id, 'ack']));
  // Events sent after the signal are not started: unanswered (the daemon
  // retries them at the exit) or given back as retry worker_stopping.
  for (const r of d.results().filter((x) => x.id > evs[2].id)) {
    assert.deepStrictEqual([r.verdict, r.reason], ['retry', 'worker_stopping']);
  }
  assert.ok(!/slow [45] started/.test(d.stdout));
  assert.match(d.stdout, /slow 1 done[\s\S]*shutdown hook ran/);
});

test('SIGTERM with nothing in flight exits at once; a second SIGTERM does not wait', async (t) => {
  const idle = new FakeDaemon(LIFECYCLE);
  t.after(() => idle.cleanup());
  await idle.ready();
  idle.kill('SIGTERM');
  assert.strictEqual((await idle.exit).code, 0);

  const busy = new FakeDaemon(LIFECYCLE);
  t.after(() => busy.cleanup());
  await busy.ready();
  const ev = eventMessage('l.slow', { payload: { n: 1, ms: 60000 } });
  busy.send(ev);
  await busy.waitFor(() => busy.stdout.includes('slow 1 started'), 'started');
  busy.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  assert.strictEqual(busy.exited, null, 'the first SIGTERM waits for the event');
  busy.kill('SIGTERM');
  const { code } = await busy.exit;
  assert.strictEqual(code, 1);
  assert.match(busy.stderr, /second signal: exiting with events in flight/);
  assert.strictEqual(busy.results().length, 0, 'the unanswered event is the daemon\'s to retry');
});

test('answers far beyond the pipe buffer while the daemon does not read: all arrive whole', async (t) => {
  const d = new FakeDaemon(path.join(__dirname, '../fixtures/workers/big_answers.js'));
  t.after(() => d.cleanup());
  await d.ready();
  d.output.pause();   // the daemon stops reading fd 4
  const evs = [];
  for (let i = 0; i < 100; i++) evs.push(eventMessage('b.big', { payload: { n: i } }));  // 100 x 64 KiB answers
  for (const ev of evs) d.send(ev);
  await new Promise((r) => setTimeout(r, 300));
  assert.strictEqual(d.results().length, 0);
  d.output.resume();
  const a = await d.answers(evs.map((e) => e.id), 30000);
  evs.forEach((ev, i) => {
    const r = a.get(ev.id);
    assert.strictEqual(r.emit[0].payload.n, i);
    assert.strictEqual(r.emit[0].payload.chunk.length, 64 * 1024);
  });
  assert.strictEqual(d.exited, null);
});
