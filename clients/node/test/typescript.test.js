'use strict';
// index.d.ts against TypeScript: the guide's handlers with their types
// (fixtures/workers/guide.ts) compile under --strict and run; misuses
// (guide_wrong.ts) are rejected line by line. Needs a tsc: $ER_TSC, or
// typescript and @types/node installed once into $TMPDIR/er-node-tsc (npm);
// skipped when neither is possible. Not a dependency of the package.
const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const { FakeDaemon, eventMessage } = require('../fixtures/daemon');

const PKG = path.join(__dirname, '..');
const FIXTURES = path.join(PKG, 'fixtures/workers');
const CACHE = path.join(os.tmpdir(), 'er-node-tsc');

function findTsc() {
  if (process.env.ER_TSC) return { tsc: process.env.ER_TSC, types: process.env.ER_TSC_TYPES || null };
  const tsc = path.join(CACHE, 'node_modules/typescript/bin/tsc');
  if (!fs.existsSync(tsc)) {
    const r = spawnSync('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error', '--prefix', CACHE,
      'typescript@5.9.3', '@types/node@20'], { encoding: 'utf8', timeout: 180000 });
    if (r.status !== 0 || !fs.existsSync(tsc)) return null;
  }
  return { tsc, types: path.join(CACHE, 'node_modules/@types') };
}

const found = findTsc();

function compile(dir, file, extra = {}) {
  const tsconfig = {
    compilerOptions: {
      strict: true, target: 'es2020', module: 'commonjs', outDir: path.join(dir, 'out'), rootDir: FIXTURES,
      baseUrl: PKG, paths: { '@event-router/worker': ['index.d.ts'] }, types: ['node'], typeRoots: [found.types],
      skipLibCheck: true, ...extra,
    },
    files: [path.join(FIXTURES, file)],
  };
  fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify(tsconfig));
  return spawnSync(process.execPath, [found.tsc, '-p', dir, '--pretty', 'false'], { encoding: 'utf8', timeout: 120000 });
}

test('guide.ts type-checks under --strict and runs as a worker', { skip: found ? false : 'no tsc (npm install failed)' }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'er-node-ts-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const r = compile(dir, 'guide.ts');
  assert.strictEqual(r.status, 0, r.stdout + r.stderr);
  // The compiled file requires '@event-router/worker' by name, as installed.
  fs.mkdirSync(path.join(dir, 'modules/@event-router'), { recursive: true });
  fs.symlinkSync(PKG, path.join(dir, 'modules/@event-router/worker'));
  const d = new FakeDaemon(path.join(dir, 'out/guide.js'), { env: { NODE_PATH: path.join(dir, 'modules') } });
  t.after(() => d.cleanup());
  await d.ready();
  const speaker = eventMessage('speaker.onboarded', { eventType: 'speaker.onboarded', payload: { speaker_id: '9' } });
  const other = eventMessage('speaker.updated', { eventType: 'speaker.updated' });
  const dfnFirst = eventMessage('rag.dfn_generated', { payload: { dfn_id: 'f-1', draft_id: 'd-1' } });
  const dfnLater = eventMessage('rag.dfn_generated', { payload: { dfn_id: 'f-1', draft_id: 'd-1' } }, { attempt: 2 });
  const dfnBad = eventMessage('rag.dfn_generated', { payload: {} });
  for (const ev of [speaker, other, dfnFirst, dfnLater, dfnBad]) d.send(ev);
  const a = await d.answers([speaker.id, other.id, dfnFirst.id, dfnLater.id, dfnBad.id]);
  assert.strictEqual(a.get(speaker.id).verdict, 'ack');
  assert.strictEqual(a.get(other.id).verdict, 'ack');
  assert.deepStrictEqual([a.get(dfnFirst.id).verdict, a.get(dfnFirst.id).delay_ms], ['retry', 1000]);
  assert.deepStrictEqual(a.get(dfnLater.id).emit, [{ event_type: 'evaluation.started', payload: { dfn_id: 'f-1' }, aggregate_id: 'd-1' }]);
  assert.deepStrictEqual([a.get(dfnBad.id).verdict, a.get(dfnBad.id).reason], ['dead_letter', 'bad_payload']);
  await d.waitFor(() => d.stdout.includes('Speaker onboarded: 9') && d.stdout.includes('Received: speaker.updated'), 'the logs');
  d.closeInput();
  assert.strictEqual((await d.exit).code, 0);
  assert.match(d.stdout, /stopping test-worker/);
});

test('misuses are type errors, each on its line', { skip: found ? false : 'no tsc (npm install failed)' }, (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'er-node-ts-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const r = compile(dir, 'guide_wrong.ts', { noEmit: true });
  assert.notStrictEqual(r.status, 0);
  const src = fs.readFileSync(path.join(FIXTURES, 'guide_wrong.ts'), 'utf8').split('\n');
  const want = src.map((l, i) => (l.includes('// error:') ? i + 1 : 0)).filter(Boolean);
  const got = [...new Set([...r.stdout.matchAll(/guide_wrong\.ts\((\d+),\d+\): error/g)].map((m) => Number(m[1])))];
  assert.deepStrictEqual(got.sort((x, y) => x - y), want, r.stdout);
});
