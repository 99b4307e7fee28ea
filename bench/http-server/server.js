// The benchmark's trivial endpoint in Node (the http module Express runs on):
// 200 with an empty body for every request, keep-alive. Same interface as
// server.cpp: `node server.js PORT`, prints "listening PORT", "requests N" at SIGTERM.
'use strict';
const http = require('http');
let requests = 0;
const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    requests++;
    res.writeHead(200, { 'Content-Length': '0' });
    res.end();
  });
});
server.keepAliveTimeout = 60000;
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    console.log(`requests ${requests}`);
    process.exit(0);
  });
}
