// The benchmark's trivial endpoint as an Express app (the services' own
// stack): 200 with an empty body for every POST, keep-alive. Same interface as
// server.cpp: `node server_express.js PORT`, prints "listening PORT", "requests N"
// at SIGTERM. Express comes from tests/integration/node_modules (npm ci there).
'use strict';
const express = require('express');
let requests = 0;
const app = express();
app.post('/events/:type', (req, res) => {
  req.resume();
  req.on('end', () => {
    requests++;
    res.status(200).end();
  });
});
const server = app.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
server.keepAliveTimeout = 60000;
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    console.log(`requests ${requests}`);
    process.exit(0);
  });
}
