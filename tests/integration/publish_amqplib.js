#!/usr/bin/env node
// Publishes events the way the TypeScript services do: camelCase envelope,
// confirm channel, persistent, JSON, routing key = eventType.
//
// usage: node publish_amqplib.js URL EXCHANGE EVENTS [--declare]
//   EVENTS   a path to a JSON file, or inline JSON ('{...}' or '[...]'): one
//            event object or an array of them. Missing envelope fields
//            (eventId, timestamp, version, correlationId) are filled in.
//            An event may carry "_routingKey" to override the routing key and
//            "_headers" for message headers; both are stripped from the body.
//   --declare  declare the exchange (durable topic) first; otherwise it must exist.
//
// Prints one JSON line per published event: {"eventId":..., "routingKey":..., "body":...}
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

function loadAmqplib() {
  try {
    return require('amqplib');
  } catch (e) {
    // Fall back to this folder's node_modules when run from elsewhere.
    return require(path.join(__dirname, 'node_modules', 'amqplib'));
  }
}

function readEvents(arg) {
  const text = /^\s*[\[{]/.test(arg) ? arg : fs.readFileSync(arg, 'utf8');
  const doc = JSON.parse(text);
  return Array.isArray(doc) ? doc : [doc];
}

async function main(argv) {
  const positional = argv.filter((a) => a !== '--declare');
  if (positional.length < 3) {
    console.error('usage: node publish_amqplib.js URL EXCHANGE EVENTS [--declare]');
    process.exit(2);
  }
  const [url, exchange, eventsArg] = positional;
  const events = readEvents(eventsArg);
  const amqp = loadAmqplib();
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createConfirmChannel();
    if (argv.includes('--declare')) {
      await ch.assertExchange(exchange, 'topic', { durable: true });
    } else {
      await ch.checkExchange(exchange);
    }
    for (const input of events) {
      const event = Object.assign({}, input);
      const routingKeyOverride = event._routingKey;
      const headers = event._headers;
      delete event._routingKey;
      delete event._headers;
      if (!('eventId' in event)) event.eventId = crypto.randomUUID();
      if (!('timestamp' in event)) event.timestamp = new Date().toISOString();
      if (!('version' in event)) event.version = 1;
      if (!('correlationId' in event)) event.correlationId = crypto.randomUUID();
      const routingKey = routingKeyOverride || event.eventType;
      if (!routingKey) throw new Error('event has neither eventType nor _routingKey');
      const body = JSON.stringify(event);
      const options = {
        persistent: true,
        contentType: 'application/json',
        messageId: event.eventId,
        timestamp: Math.floor(Date.now() / 1000),
        type: event.eventType,
      };
      if (event.correlationId) options.correlationId = event.correlationId;
      if (headers) options.headers = headers;
      await new Promise((resolve, reject) => {
        ch.publish(exchange, routingKey, Buffer.from(body), options, (err) => (err ? reject(err) : resolve()));
      });
      process.stdout.write(JSON.stringify({ eventId: event.eventId, routingKey, body }) + '\n');
    }
    await ch.waitForConfirms();
    await ch.close();
  } finally {
    await conn.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
