'use strict';
// hello/ready, protocol version mismatch, and what is not the protocol.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { spawnSync } = require('child_process');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

const VERDICTS = path.join(__dirname, '../fixtures/workers/verdicts.js');

test('hello is answered with ready, protocol 1, and start() resolves after it', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  assert.strictEqual(d.messages.length, 0, 'the worker writes nothing before hello');
  const ready = await d.ready();
  assert.deepStrictEqual(ready, { type: 'ready', protocol: 1 });
  await d.waitFor(() => d.stdout.includes('started: handler=test-worker'), 'start() to resolve with the hello');
  const ev = eventMessage('t.ack');
  d.send(ev);
  const a = await d.answers([ev.id]);
  assert.deepStrictEqual(a.get(ev.id), { type: 'result', id: ev.id, verdict: 'ack' });
});

test('the fds come from ER_WORKER_IN_FD / ER_WORKER_OUT_FD', async (t) => {
  const d = new FakeDaemon(VERDICTS, { fds: [6, 5] });
  t.after(() => d.cleanup());
  assert.deepStrictEqual(await d.ready(), { type: 'ready', protocol: 1 });
  const ev = eventMessage('t.ack');
  d.send(ev);
  assert.strictEqual((await d.answers([ev.id])).get(ev.id).verdict, 'ack');
});

test('a hello with another protocol version: answers 1 and exits non-zero with a clear message', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  d.send({ type: 'hello', protocol: 2, handler: 'h', queue: 'q', concurrency: 4 });
  const { code } = await d.exit;
  assert.deepStrictEqual(d.messages, [{ type: 'ready', protocol: 1 }]);
  assert.notStrictEqual(code, 0);
  assert.match(d.stderr, /the daemon speaks protocol 2, this helper \(@event-router\/worker\) speaks 1/);
  assert.ok(!d.stdout.includes('started'), 'start() does not resolve');
});

test('unknown keys and message types are ignored (later versions may add them)', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  d.hello({ future_key: { x: 1 } });
  await d.waitFor(() => d.messages.length === 1, 'ready');
  d.send({ type: 'ping_from_the_future', id: 5 });
  d.send({ type: 'ping_from_the_future', id: 6 });
  const ev = eventMessage('t.ack', {}, { new_field: [1, 2] });
  d.send(ev);
  const a = await d.answers([ev.id]);
  assert.strictEqual(a.get(ev.id).verdict, 'ack');
  assert.strictEqual(d.results().length, 1);
  assert.strictEqual(d.stderr.match(/ignoring messages of type "ping_from_the_future"/g).length, 1, 'said once');
});

test('a line that is not JSON is a protocol error: exit 1, nothing answered', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  await d.ready();
  d.sendRaw('this is not json\n');
  const { code } = await d.exit;
  assert.strictEqual(code, 1);
  assert.match(d.stderr, /protocol error: a line from the daemon is not JSON/);
  assert.strictEqual(d.results().length, 0);
});

test('an event before hello is a protocol error', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  d.send(eventMessage('t.ack'));
  const { code } = await d.exit;
  assert.strictEqual(code, 1);
  assert.match(d.stderr, /protocol error: an event before hello/);
  assert.strictEqual(d.messages.length, 0);
});

test('end of input before hello: exits 0 without answering', async (t) => {
  const d = new FakeDaemon(VERDICTS);
  t.after(() => d.cleanup());
  d.closeInput();
  const { code } = await d.exit;
  assert.strictEqual(code, 0);
  assert.strictEqual(d.messages.length, 0);
});

test('run by hand without fds 3/4: exits 2 and says what it is', () => {
  const env = { ...process.env };
  delete env.ER_WORKER_IN_FD;
  delete env.ER_WORKER_OUT_FD;
  const r = spawnSync(process.execPath, [VERDICTS], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000 });
  assert.strictEqual(r.status, 2);
  assert.match(r.stderr, /fd 3\/4 not a pipe: this program is an event-router worker/);
});

test('files on fds 3/4 (replaying a capture by hand): answered, exit 0 at its end', (t) => {
  const fs = require('fs');
  const os = require('os');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'er-node-replay-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const evs = [eventMessage('t.ack'), eventMessage('t.dead')];
  const lines = [{ type: 'hello', protocol: 1, handler: 'h', queue: 'q', concurrency: 4 }, ...evs];
  fs.writeFileSync(path.join(dir, 'in'), lines.map((l) => JSON.stringify(l) + '\n').join(''));
  const inFd = fs.openSync(path.join(dir, 'in'), 'r');
  const outFd = fs.openSync(path.join(dir, 'out'), 'w');
  const r = spawnSync(process.execPath, [VERDICTS], { stdio: ['ignore', 'pipe', 'pipe', inFd, outFd], encoding: 'utf8', timeout: 10000 });
  fs.closeSync(inFd);
  fs.closeSync(outFd);
  assert.strictEqual(r.status, 0, r.stderr);
  const out = fs.readFileSync(path.join(dir, 'out'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  assert.deepStrictEqual(out[0], { type: 'ready', protocol: 1 });
  assert.deepStrictEqual(out.slice(1).map((m) => [m.id, m.verdict]).sort(), [[evs[0].id, 'ack'], [evs[1].id, 'dead_letter']]);
});
