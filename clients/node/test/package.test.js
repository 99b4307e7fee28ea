'use strict';
// The package as installed: its name and entry points, no runtime
// dependencies, and ESM named imports of the CommonJS module.
const test = require('node:test');
const assert = require('node:assert');
const path = require('path');
const { spawnSync } = require('child_process');

const PKG = path.join(__dirname, '..');

test('package.json: @event-router/worker, CommonJS entry and typings, no dependencies', () => {
  const pkg = require('../package.json');
  assert.strictEqual(pkg.name, '@event-router/worker');
  assert.strictEqual(require.resolve(PKG), path.join(PKG, pkg.main));
  assert.ok(require('fs').existsSync(path.join(PKG, pkg.types)));
  assert.strictEqual(pkg.dependencies, undefined);
  assert.strictEqual(pkg.type, undefined, 'CommonJS, so require() finds it in node\'s global folders');
});

test('ESM: named imports of Worker, Retry, DeadLetter', () => {
  const src = `import { Worker, Retry, DeadLetter, PROTOCOL_VERSION } from ${JSON.stringify(path.join(PKG, 'index.js'))};
    const e = new Retry({ after: 5 });
    console.log(typeof Worker, e instanceof Error, e.after, new DeadLetter('x').reason, PROTOCOL_VERSION);`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', src], { encoding: 'utf8', timeout: 10000 });
  assert.strictEqual(r.stdout.trim(), 'function true 5 x 1', r.stderr);
});
