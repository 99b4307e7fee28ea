#!/usr/bin/env node
// Bench worker: what the amqplib peer does (parse, dispatch by type, no-op)
// behind event-router, with the Node helper.
'use strict';
// ER_NODE_CLIENT: the in-tree helper (bench/workers.sh), else the installed one.
const { Worker } = require(process.env.ER_NODE_CLIENT || '@event-router/worker');

const worker = new Worker();
worker.registerHandler('speaker.onboarded', async (event) => {});
worker.registerHandler('speaker.updated', async (event) => {});
worker.registerHandler('draft.ingested', async (event) => {});
worker.registerHandler('rag.dfn_generated', async (event) => {});
worker.registerHandler('evaluation.completed', async (event) => {});
worker.start();
