#!/usr/bin/env node
// Publishes the demo's camelCase sample event like the TypeScript services do
// (amqplib confirm channel, persistent JSON, routing key = eventType).
//   RABBITMQ_URL       default amqp://guest:guest@127.0.0.1:5672/
//   RABBITMQ_EXCHANGE  default draft-genie.events
// amqplib comes from tests/integration/node_modules (npm ci there first).
'use strict';
const path = require('path');
const crypto = require('crypto');

let amqp;
try {
  amqp = require(path.join(__dirname, '..', 'tests', 'integration', 'node_modules', 'amqplib'));
} catch (e) {
  amqp = require('amqplib');
}

const url = process.env.RABBITMQ_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const exchange = process.env.RABBITMQ_EXCHANGE || 'draft-genie.events';

async function main() {
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createConfirmChannel();
    await ch.assertExchange(exchange, 'topic', { durable: true });
    const event = {
      eventId: crypto.randomUUID(),
      eventType: 'speaker.updated',
      aggregateId: '123',
      aggregateType: 'Speaker',
      timestamp: new Date().toISOString(),
      version: 1,
      correlationId: crypto.randomUUID(),
      payload: { speaker_id: '123', name: 'John Q. Doe', bucket: 'GOOD' },
    };
    ch.publish(exchange, event.eventType, Buffer.from(JSON.stringify(event)), {
      persistent: true,
      contentType: 'application/json',
      messageId: event.eventId,
      correlationId: event.correlationId,
      timestamp: Math.floor(Date.now() / 1000),
      type: event.eventType,
    });
    await ch.waitForConfirms();
    console.log(`published ${event.eventType} eventId=${event.eventId} (amqplib, camelCase)`);
    await ch.close();
  } finally {
    await conn.close();
  }
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
