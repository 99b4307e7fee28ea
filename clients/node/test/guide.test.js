'use strict';
// The reference guide's TypeScript handlers (event-infrastructure-guide.md),
// copied verbatim into fixtures/workers/guide_*.js, run unchanged.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

// The guide's own event, as its TypeScript publisher writes it (camelCase).
const guideEvent = () => ({
  eventId: 'uuid', eventType: 'speaker.onboarded', aggregateId: '123', aggregateType: 'Speaker',
  timestamp: new Date().toISOString(), version: 1, correlationId: 'correlation-uuid',
  payload: { speaker_id: '123', external_id: 'ext-123', name: 'John Doe', bucket: 'GOOD' },
});

// A ready worker from fixtures/workers/<file> and the guide's event for it.
async function guideWorker(t, file) {
  const d = new FakeDaemon(path.join(__dirname, '../fixtures/workers', file));
  t.after(() => d.cleanup());
  await d.ready();
  const ev = eventMessage('speaker.onboarded');
  ev.event = guideEvent();
  return { d, ev };
}

test('handleSpeakerOnboarded (Consuming Events) runs unchanged: acks, logs the speaker', async (t) => {
  const { d, ev: ok } = await guideWorker(t, 'guide_consuming.js');
  // Without a payload the handler throws a TypeError: the guide's "throw to retry".
  const broken = eventMessage('speaker.onboarded', { payload: undefined });
  delete broken.event.payload;
  d.send(ok);
  d.send(broken);
  const a = await d.answers([ok.id, broken.id]);
  assert.strictEqual(a.get(ok.id).verdict, 'ack');
  await d.waitFor(() => d.stdout.includes('Speaker onboarded: 123\n'), 'the handler\'s log line');
  const r = a.get(broken.id);
  assert.deepStrictEqual([r.verdict, r.reason], ['retry', 'handler_failed']);
  assert.match(r.detail, /^TypeError: Cannot read properties of undefined \(reading 'speaker_id'\)/);
});

test('the inline async (eventData) => console.log(...) handler (Complete Example) runs unchanged', async (t) => {
  const { d, ev } = await guideWorker(t, 'guide_complete.js');
  d.send(ev);
  const a = await d.answers([ev.id]);
  assert.strictEqual(a.get(ev.id).verdict, 'ack');
  await d.waitFor(() => d.stdout.includes('Received: speaker.onboarded\n'), 'the handler\'s log line');
});
