'use strict';
// Integration-test worker on the Node helper, required by its package name:
// the test puts a folder on NODE_PATH where @event-router/worker is a link to
// <source>/clients/node. The same as py_worker.py (see there for the payload
// keys and the records), in the helper's idioms: resolve = ack, throw
// Retry/DeadLetter/anything else, ctx.emit.
const fs = require('fs');
const { Worker, Retry, DeadLetter } = require('@event-router/worker');

const RECORD = process.env.RECORD_FILE;
const GENERATION = process.env.GENERATION ?? null;

function record(phase, fields) {
  const line = { phase, pid: process.pid, time: Date.now() / 1000, generation: GENERATION, ...fields };
  fs.appendFileSync(RECORD, JSON.stringify(line) + '\n');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const worker = new Worker();
let inflight = 0;  // events in this process's handler at once

worker.registerHandler('#', async (eventData, ctx) => {
  inflight += 1;
  try {
    await steered(eventData, ctx);
  } finally {
    inflight -= 1;
  }
});

async function steered(eventData, ctx) {
  const p = eventData.payload || {};
  const actions = p.attempts || ['ack'];
  const action = actions[Math.min(ctx.attempt, actions.length) - 1];
  const ids = { event_id: ctx.eventId, attempt: ctx.attempt };
  record('start', { ...ids, inflight, event_type: ctx.eventType, correlation_id: ctx.correlationId,
    routing_key: ctx.routingKey, queue: ctx.queue, redelivered: ctx.redelivered, handler: ctx.handler });
  for (const line of p.stdout || []) console.log(line);
  if (p.forge_answer) {
    const line = `{"type":"result","id":${ctx.id},"verdict":"dead_letter"}`;
    record('forged', { ...ids, line });
    console.log(line);
  }
  for (const e of p.emit || []) {
    ctx.emit(e.event_type, e.payload, { aggregateId: e.aggregate_id, aggregateType: e.aggregate_type,
      routingKey: e.routing_key });
  }
  if (p.sleep_ms) await sleep(p.sleep_ms);
  if (action === 'crash') {
    record('crash', ids);
    process.exit(7);
  }
  if (action === 'hang') {
    record('hang', ids);
    await sleep(3600 * 1000);
  }
  record('done', { ...ids, action });
  if (action === 'retry') throw new Retry({ after: p.retry_after_ms, reason: p.reason, detail: p.detail });
  if (action === 'fail') throw new Error(p.message || 'boom');
  if (action === 'dead_letter') throw new DeadLetter(p.reason, p.detail);
}

worker.onShutdown(() => record('exit', {}));
record('boot', {});
worker.start();
