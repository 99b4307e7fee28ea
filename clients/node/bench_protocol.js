'use strict';
// Protocol throughput of the Node helper alone (no broker, no daemon): feeds
// N events through pipes to a worker child (fixtures/workers/noop.js: parse,
// dispatch by type, a no-op async handler), keeping `concurrency` in flight
// as the daemon does, and prints events/s and the worker's CPU per event.
//   node bench_protocol.js [N=200000] [concurrency=10,100]
const fs = require('fs');
const path = require('path');
const { FakeDaemon, eventMessage } = require('./fixtures/daemon');

const N = Number(process.argv[2] || 200000);
const levels = (process.argv[3] || '10,100').split(',').map(Number);
const TICK = 100;  // clock ticks per second, for /proc/<pid>/stat

function cpuSeconds(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / TICK;  // utime + stime
}

async function run(concurrency) {
  const d = new FakeDaemon(path.join(__dirname, 'fixtures/workers/noop.js'));
  d.hello({ concurrency });
  await d.waitFor(() => d.messages.length === 1, 'ready');
  d.output.removeAllListeners('data');   // count lines only: the bench side stays cheap
  // A realistic event (~400 bytes), one line each, ids in order.
  const template = eventMessage('speaker.onboarded', {
    event_id: '5b0c7d1e-0f6a-4c57-9a3e-2f1d7c1b9e11', aggregate_id: 's-123', aggregate_type: 'Speaker',
    timestamp: '2026-12-01T10:00:00.000Z', version: 1, correlation_id: 'c-9',
    payload: { speaker_id: 's-123', external_id: 'ext-123', name: 'John Doe', bucket: 'GOOD' },
  });
  const prefix = JSON.stringify({ ...template, id: 0 }).replace('"id":0', '"id":');
  const line = (id) => prefix.replace('"id":', `"id":${id}`) + '\n';
  let sent = 0;
  let answered = 0;
  const cpu0 = cpuSeconds(d.pid);
  const t0 = process.hrtime.bigint();
  const fill = () => {
    let batch = '';
    while (sent < N && sent - answered < concurrency) batch += line(++sent);
    if (batch) d.input.write(batch);
  };
  await new Promise((resolve) => {
    d.output.on('data', (chunk) => {
      for (let i = chunk.indexOf('\n'); i !== -1; i = chunk.indexOf('\n', i + 1)) answered++;
      if (answered === N) resolve(); else fill();
    });
    fill();
  });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = cpuSeconds(d.pid) - cpu0;
  d.closeInput();
  const { code } = await d.exit;
  d.cleanup();
  if (code !== 0) throw new Error(`worker exited ${code}: ${d.stderr}`);
  return { concurrency, rate: N / secs, cpuPerEvent: (cpu / N) * 1e6, secs };
}

(async () => {
  console.log(`node ${process.version}, ${N} events per run`);
  for (const c of levels) {
    const r = await run(c);
    console.log(`concurrency ${String(c).padStart(4)}: ${Math.round(r.rate).toString().padStart(7)} events/s ` +
      `(${r.secs.toFixed(2)} s; worker CPU ${r.cpuPerEvent.toFixed(1)} µs/event)`);
  }
})().catch((e) => { console.error(e); process.exit(1); });
