// The rule that leaves files out of CI's second integration run (test/support/server-free.ts): a file
// is left out only when nothing it imports can reach the run's database server.
import { globSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { serverFreeFiles } from './support/server-free.js';

const ROOT = resolve(import.meta.dirname, '..');
// Built, so that this file's own text does not read as reaching the server.
const INJECT_ADMIN = `inject('pg${'AdminUrl'}')`;
const ENV_URL = `process.env.TEST_${'DATABASE_URL'}`;

describe('the rule, on a tree of its own', () => {
  const dir = mkdtempSync(join(tmpdir(), 'meterbox-server-free-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const write = (name: string, text: string): void => {
    mkdirSync(dirname(join(dir, name)), { recursive: true });
    writeFileSync(join(dir, name), text);
  };
  write('free.test.ts', "import { lib } from './lib.js';\nimport { it } from 'vitest';\n");
  write('lib.ts', "import { readFileSync } from 'node:fs';\nexport const lib = 1;\n");
  write('kit.ts', `import { inject } from 'vitest';\nexport const url = () => ${INJECT_ADMIN};\n`);
  write('direct.test.ts', "import { url } from './kit.js';\n");
  write('dynamic.test.ts', "const helper = await import('./deep/helper.js');\n");
  write('deep/helper.ts', "export async function h() { return import('../kit.js'); }\n");
  write('env.test.ts', `const url = ${ENV_URL};\n`);
  write('missing.test.ts', "import { gone } from './gone.js';\n");
  write('index.test.ts', "import { x } from './folder/index.js';\nimport { y } from './folder';\n");
  write('folder/index.ts', 'export const x = 1; export const y = 2;\n');
  // A cycle whose far side reaches the server, decided from either end, and a cycle that does not.
  write('cycle-a.test.ts', "import './x.js';\n");
  write('cycle-b.test.ts', "import './y.js';\n");
  write('x.ts', "import './y.js';\n");
  write('y.ts', "import './x.js';\nimport './kit.js';\n");
  write('loop.test.ts', "import './p.js';\n");
  write('p.ts', "import './q.js';\n");
  write('q.ts', "import './p.js';\nimport 'pg';\n");
  const all = [
    'free.test.ts',
    'direct.test.ts',
    'dynamic.test.ts',
    'env.test.ts',
    'missing.test.ts',
    'index.test.ts',
    'cycle-a.test.ts',
    'cycle-b.test.ts',
    'loop.test.ts',
  ];

  it('leaves out only the files known to be free of the server', () => {
    expect(serverFreeFiles(dir, all).sort()).toEqual(['free.test.ts', 'index.test.ts', 'loop.test.ts']);
  });

  it('decides a file the same whichever files were decided before it', () => {
    for (const file of all) {
      const alone = serverFreeFiles(dir, [file]);
      expect(serverFreeFiles(dir, [...all].reverse()).includes(file)).toBe(alone.length === 1);
    }
  });

  it('keeps the form the files were given in', () => {
    expect(serverFreeFiles(dir, [join(dir, 'free.test.ts')])).toEqual([join(dir, 'free.test.ts')]);
  });
});

describe('the rule, on this repository', () => {
  const files = globSync('test/**/*.test.ts', { cwd: ROOT });
  const free = new Set(serverFreeFiles(ROOT, files));

  it('never leaves out a file that takes a database of the per-file kit', () => {
    const kitUsers = files.filter((file) =>
      /support\/(?:database|fixtures|test)\.js['"]/.test(readFileSync(join(ROOT, file), 'utf8')),
    );
    expect(kitUsers.length).toBeGreaterThan(100);
    expect(kitUsers.filter((file) => free.has(file))).toEqual([]);
  });

  it('leaves out the simulation and the files of pure rules', () => {
    for (const file of [
      'test/sim/worlds-1.test.ts',
      'test/sim/regressions.test.ts',
      'test/ingest/schemas.test.ts',
      'test/layering.test.ts',
    ]) {
      expect.soft(free.has(file), file).toBe(true);
    }
  });
});
