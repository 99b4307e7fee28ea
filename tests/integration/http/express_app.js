// The Express service of test_http_push.py: `node express_app.js PORT RECORD_FILE [KEEP_ALIVE_MS]`.
// Same records and payload steering as fastapi_app.py; KEEP_ALIVE_MS sets how
// long the server keeps an idle keep-alive connection before it closes it.
'use strict';
const express = require('express');
const fs = require('fs');

const [port, recordFile, keepAliveMs] = process.argv.slice(2);
const app = express();
app.use(express.raw({ type: () => true, limit: '20mb' }));

app.post('*', (req, res) => {
  const body = req.body instanceof Buffer ? req.body.toString('utf8') : '';
  const attempt = Number(req.get('ce-attempt') || '1');
  const headers = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) headers.push([req.rawHeaders[i].toLowerCase(), req.rawHeaders[i + 1]]);
  fs.appendFileSync(recordFile, JSON.stringify({
    time: Date.now() / 1000, raw_path: req.originalUrl.split('?')[0], query: req.originalUrl.split('?')[1] || '',
    headers, body, client_port: req.socket.remotePort, attempt,
  }) + '\n');
  let steps = [{}];
  try {
    steps = (JSON.parse(body).payload || {}).steps || [{}];
  } catch (e) { /* not JSON: the default answer */ }
  const step = steps[Math.min(attempt, steps.length) - 1];
  const answer = () => {
    if ('retry_after' in step) res.set('Retry-After', String(step.retry_after));
    res.status(step.status || 200);
    if ('json' in step) return res.json(step.json);
    res.type(step.content_type || 'text/plain').send(step.body || '');
  };
  if (step.sleep_ms) setTimeout(answer, step.sleep_ms); else answer();
});

const server = app.listen(Number(port), '127.0.0.1', () => console.log('listening'));
if (keepAliveMs) server.keepAliveTimeout = Number(keepAliveMs);
