// The docs check (scripts/check-docs.ts, `npm run docs:check` in CI) passes on the docs as they are and
// fails, naming file and line, on each kind of mistake planted in a temporary copy of them: a wrong
// command, an unknown setting, a missing setting, a broken link, a broken anchor and a wrong route.
import { execFile } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { checkDocs, type Finding, openApiRoutes } from '../../scripts/check-docs.js';

const REPO = join(import.meta.dirname, '../..');
const COPIED = ['README.md', 'docs', '.env.example', 'package.json', 'compose.yaml'];

let routes: Map<string, Set<string>>;
beforeAll(async () => {
  routes = await openApiRoutes();
});

/** A temporary copy of the docs (and what they are checked against), removed after the test. */
function copyOfDocs(): string {
  const root = mkdtempSync(join(tmpdir(), 'meterbox-docs-'));
  for (const path of COPIED) cpSync(join(REPO, path), join(root, path), { recursive: true });
  onTestFinished(() => rmSync(root, { recursive: true, force: true }));
  return root;
}

/** Edits one file of the copy; returns the 1-based line of the first line `edit` changed or added. */
function plant(root: string, file: string, edit: (text: string) => string): number {
  const before = readFileSync(join(root, file), 'utf8');
  const after = edit(before);
  expect(after).not.toBe(before);
  writeFileSync(join(root, file), after);
  const a = before.split('\n');
  const b = after.split('\n');
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return i + 1;
}

/** Appends a paragraph to a file of the copy; returns its line. */
function append(root: string, file: string, paragraph: string): number {
  return plant(root, file, (text) => `${text.replace(/\n*$/, '')}\n\n${paragraph}\n`);
}

const check = (root: string) => checkDocs({ root, repo: REPO, routes });
const at = (file: string, line: number, message: RegExp) =>
  expect.objectContaining<Finding>({ file, line, message: expect.stringMatching(message) });

describe('docs check', () => {
  it("passes on the repository's docs", async () => {
    expect(await check(copyOfDocs())).toEqual([]);
  });

  it('fails on a command the CLI registry does not have, a flag its command does not take, and an unknown npm script', async () => {
    const root = copyOfDocs();
    const command = append(root, 'docs/runbooks.md', 'Then run `meterbox outbox purge --all`.');
    const flag = append(
      root,
      'docs/operations.md',
      '```sh\nmeterbox outbox list --state failed   # rows\n```',
    );
    const script = append(root, 'README.md', 'Check the docs with `npm run docs:chek`.');
    expect(await check(root)).toEqual([
      at('docs/operations.md', flag + 1, /meterbox outbox list --state failed.*takes no --state/),
      at('docs/runbooks.md', command, /meterbox outbox purge --all.*no such command/),
      at('README.md', script, /npm run docs:chek.*no script "docs:chek"/),
    ]);
  });

  it('fails on a setting config.ts does not read, in the docs and in .env.example', async () => {
    const root = copyOfDocs();
    const inDocs = append(root, 'docs/operations.md', 'Raise `DELIVERY_MAX_INFLIGHT` for more calls.');
    const inExample = append(root, '.env.example', 'DELIVERY_TURBO=1');
    const wildcard = append(root, 'docs/scaling.md', 'The `BUDGET_*` settings tune the budget.');
    expect(await check(root)).toEqual([
      at('.env.example', inExample, /DELIVERY_TURBO is not a setting/),
      at('docs/operations.md', inDocs, /DELIVERY_MAX_INFLIGHT.*not a setting src\/config\.ts reads/),
      at('docs/scaling.md', wildcard, /BUDGET_\*.*no setting of src\/config\.ts starts with BUDGET_/),
    ]);
  });

  it('fails on a setting missing from .env.example and from the settings reference', async () => {
    const root = copyOfDocs();
    plant(root, '.env.example', (text) => text.replace(/^DB_POOL_MAX=.*\n/m, ''));
    plant(root, 'README.md', (text) => text.replace(/^\| `DB_POOL_MAX` \|.*\n/m, ''));
    const heading = readFileSync(join(root, 'README.md'), 'utf8').split('\n').indexOf('## Configuration') + 1;
    expect(await check(root)).toEqual([
      at('.env.example', 1, /DB_POOL_MAX.*has no DB_POOL_MAX= line/),
      at('README.md', heading, /DB_POOL_MAX.*not in the settings reference/),
    ]);
  });

  it('fails on a broken link and on broken anchors, in another file and in the same one', async () => {
    const root = copyOfDocs();
    const file = append(root, 'README.md', 'See [the guide](docs/guide.md).');
    const anchor = append(root, 'README.md', 'See [corrections](docs/operations.md#usage-correction).');
    const own = append(root, 'docs/runbooks.md', 'Back to [the top](#meterbox-runbook).');
    expect(await check(root)).toEqual([
      at('docs/runbooks.md', own, /#meterbox-runbook: docs\/runbooks\.md has no heading/),
      at('README.md', file, /docs\/guide\.md does not exist/),
      at('README.md', anchor, /docs\/operations\.md has no heading with anchor #usage-correction/),
    ]);
  });

  it('fails on a route the OpenAPI document does not have, a wrong method, and a route missing from the table', async () => {
    const root = copyOfDocs();
    let table = 0;
    const wrong = plant(root, 'README.md', (text) => {
      table = text.split('\n').indexOf('| route | auth | purpose |') + 1;
      return text.replace(
        '| `POST /webhooks/stripe` |',
        '| `POST /webhooks/stripe`, `GET /v1/readings`, `/v1/alerts` |',
      );
    });
    plant(root, 'README.md', (text) => text.replace('`PATCH /v1/sensors/:id`', '`/v1/sensors/:id/name`'));
    const found = await check(root);
    expect(found).toEqual([
      at('README.md', table, /PATCH \/v1\/sensors\/\{…\} \(in the OpenAPI document\) is missing/),
      at('README.md', table + 3, /\/v1\/sensors\/\{…\}\/name is not in the OpenAPI document/),
      at('README.md', wrong, /GET \/v1\/readings: the OpenAPI document has POST on this path, not GET/),
      at('README.md', wrong, /\/v1\/alerts is not in the OpenAPI document/),
    ]);
  });

  it('prints each finding as file:line: message and exits 1 (npm run docs:check)', async () => {
    const root = copyOfDocs();
    const line = append(root, 'docs/runbooks.md', 'Then run `meterbox outbox purge`.');
    const run = promisify(execFile);
    const failed = await run(process.execPath, ['--import', 'tsx', 'scripts/check-docs.ts', '--root', root], {
      cwd: REPO,
    }).then(
      () => undefined,
      (err: { code: number; stdout: string; stderr: string }) => err,
    );
    expect(failed?.code).toBe(1);
    expect(failed?.stdout.trim().split('\n')).toEqual([
      `docs/runbooks.md:${line}: \`meterbox outbox purge\`: no such command in src/commands.ts`,
    ]);
    expect(failed?.stderr).toContain('docs:check: 1 finding(s)');
  }, 60_000);
});
