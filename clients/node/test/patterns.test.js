'use strict';
// RabbitMQ topic patterns: `*` one word, `#` zero or more; first match wins.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { topicMatch } = require('..');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

test('topicMatch follows RabbitMQ topic semantics', () => {
  const yes = [['a.b', 'a.b'], ['a.*', 'a.b'], ['*.b', 'a.b'], ['#', 'a.b.c'], ['#', 'a'], ['a.#', 'a'],
    ['a.#', 'a.b.c'], ['#.c', 'c'], ['#.c', 'a.b.c'], ['a.#.c', 'a.c'], ['a.#.c', 'a.b.b.c'], ['a.*.#', 'a.b'],
    ['#.#', 'a'], ['a.*', 'a.']];
  const no = [['a.b', 'a.c'], ['a.*', 'a'], ['a.*', 'a.b.c'], ['*', 'a.b'], ['a.#.c', 'a.b'], ['a.b', 'a.b.c'],
    ['a.*.c', 'a.c'], ['a', 'ab']];
  for (const [p, s] of yes) assert.ok(topicMatch(p, s), `${p} matches ${s}`);
  for (const [p, s] of no) assert.ok(!topicMatch(p, s), `${p} does not match ${s}`);
});

test('the worker routes by event type, first registered match wins', async (t) => {
  const d = new FakeDaemon(path.join(__dirname, '../fixtures/workers/patterns.js'));
  t.after(() => d.cleanup());
  await d.ready();
  const cases = {
    'speaker.onboarded': 'exact',
    'speaker.updated': 'speaker.*',
    'draft.done': 'draft.#.done',
    'draft.a.b.done': 'draft.#.done',
    'draft.ingested': 'draft.#',
    'draft': 'draft.#',
    'q.x.z': '*.x.*',
    'speaker.y.z': null,      // `*` is one word only
    'rag.dfn_generated': null,
  };
  const sent = Object.keys(cases).map((type) => {
    const ev = eventMessage(type, {}, { routing_key: 'not.the.type' });
    d.send(ev);
    return [ev.id, type];
  });
  const a = await d.answers(sent.map(([id]) => id));
  for (const [id, type] of sent) {
    const r = a.get(id);
    if (cases[type] === null) {
      assert.deepStrictEqual([r.verdict, r.reason], ['dead_letter', 'no_handler'], type);
    } else {
      assert.strictEqual(r.verdict, 'ack', type);
      assert.strictEqual(r.emit[0].payload.by, cases[type], type);
    }
  }
});
