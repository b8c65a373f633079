// The docs check (scripts/check-docs.ts, `npm run docs:check` in CI) passes on the docs as they are and
// fails, naming file and line, on each kind of mistake planted in a temporary copy of them: a wrong
// command, an unknown setting, a missing setting, a broken link, a broken anchor, a wrong route, and a
// generated API page (docs/http-api.md) that differs from what `npm run docs:api` renders.
import { execFile, execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { checkDocs, type Finding } from '../../scripts/check-docs.js';
import { type OpenApiDocument, openApiDocument } from '../../scripts/gen-api-docs.js';

const REPO = join(import.meta.dirname, '../..');
const COPIED = ['README.md', 'docs', 'CHANGELOG.md', '.env.example', 'package.json', 'compose.yaml'];

let openApi: OpenApiDocument;
beforeAll(async () => {
  openApi = await openApiDocument();
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

const check = (root: string, doc = openApi) => checkDocs({ root, repo: REPO, openApi: doc });
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
    plant(root, 'docs/configuration.md', (text) => text.replace(/^\| `DB_POOL_MAX` \|.*\n/m, ''));
    const heading =
      readFileSync(join(root, 'docs/configuration.md'), 'utf8').split('\n').indexOf('# Configuration') + 1;
    expect(await check(root)).toEqual([
      at('.env.example', 1, /DB_POOL_MAX.*has no DB_POOL_MAX= line/),
      at('docs/configuration.md', heading, /DB_POOL_MAX.*not in the settings reference/),
    ]);
  });

  it("fails on a commit the repository's history does not hold, and passes one it does (not a UUID's digits)", async () => {
    const root = copyOfDocs();
    const head = execFileSync('git', ['-C', REPO, 'rev-parse', '--short=7', 'HEAD']).toString().trim();
    append(
      root,
      'docs/benchmarks.md',
      `Measured at commit ${head}, organization 72f59720-0b5f-49c8-9a49-827af59c6b8c.`,
    );
    const missing = append(
      root,
      'docs/benchmarks.md',
      'Measured at commit 0badc0de1, which no history holds.',
    );
    expect(await check(root)).toEqual([
      at('docs/benchmarks.md', missing, /commit 0badc0de1 is not in this repository's history/),
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
    const page = 'docs/http-api.md';
    let table = 0;
    const wrong = plant(root, page, (text) => {
      table = text.split('\n').indexOf('| route | auth | summary |') + 1;
      return text.replace(
        '| [`POST /webhooks/stripe`](#post-webhooksstripe) |',
        '| [`POST /webhooks/stripe`](#post-webhooksstripe), `GET /v1/readings`, `/v1/alerts` |',
      );
    });
    const renamed = plant(root, page, (text) =>
      text.replace('[`PATCH /v1/sensors/{id}`](', '[`/v1/sensors/{id}/name`]('),
    );
    expect(await check(root)).toEqual([
      at(page, table, /PATCH \/v1\/sensors\/\{…\} \(in the OpenAPI document\) is missing/),
      at(page, wrong, /GET \/v1\/readings: the OpenAPI document has POST on this path, not GET/),
      at(page, wrong, /\/v1\/alerts is not in the OpenAPI document/),
      // The page is generated: an edit by hand is also a difference from what the generator renders.
      at(page, wrong, /differs from what `npm run docs:api` renders/),
      at(page, renamed, /\/v1\/sensors\/\{…\}\/name is not in the OpenAPI document/),
    ]);
  });

  it('fails when the generated API page differs from the OpenAPI document, or is missing', async () => {
    const root = copyOfDocs();
    const page = 'docs/http-api.md';
    // A route's description changed in the code, and the page was not generated again.
    const changed = structuredClone(openApi);
    const readings = changed.paths['/v1/readings']!.post!;
    readings.summary = `Store a batch of readings, all or nothing. ${readings.summary}`;
    const lines = readFileSync(join(root, page), 'utf8').split('\n');
    const row = lines.findIndex((line) => line.startsWith('| [`POST /v1/readings`]')) + 1;
    expect(row).toBeGreaterThan(0);
    expect(await check(root, changed)).toEqual([
      at(
        page,
        row,
        /differs from what `npm run docs:api` renders.*Store a batch of readings, all or nothing/,
      ),
    ]);
    // Edited by hand: a line of an operation's section.
    const edited = plant(root, page, (text) => text.replace('Auth: API key.', 'Auth: none.'));
    expect(await check(root)).toEqual([at(page, edited, /differs from what `npm run docs:api` renders/)]);
    // Missing (the links to it break too).
    rmSync(join(root, page));
    expect(await check(root)).toEqual(
      expect.arrayContaining([at(page, 1, /docs\/http-api\.md is missing: run `npm run docs:api`/)]),
    );
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
