// `npm run docs:check`: what the documentation shows must still hold. For README.md, docs/*.md,
// CHANGELOG.md (when there is one) and .env.example:
//   * every `npm run <script>` (and `npm start`, `npm test`) names a script of package.json, and every
//     `meterbox <command …>` (or `npm run cli -- <command …>`) a command of the CLI registry
//     (src/commands.ts) with flags that command takes;
//   * every environment variable named is one src/config.ts reads (its zod schema's keys), or one the
//     check knows is read elsewhere (compose.yaml's, the tools' below, a retired setting), and every
//     setting config.ts reads is in .env.example and in the settings reference (SETTINGS_REFERENCE);
//   * every relative link, and its #anchor (GitHub's heading slugs), resolves;
//   * the routes table (a table whose first column is "route") matches the OpenAPI document the app
//     serves, both ways; the app is built on a context that never connects to a database;
//   * docs/http-api.md is exactly what `npm run docs:api` (scripts/gen-api-docs.ts) renders from that
//     document, so the API reference cannot drift from the routes.
// Each finding is printed as `file:line: message`; any finding exits 1.
//
// Why this file is long: one check per kind of claim the docs make (commands, settings, links, routes) over
// one markdown reader; a file per check is still open.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { COMMANDS } from '../src/commands.js';
import { configSchema, retiredSettingWarnings } from '../src/config.js';
import { API_DOCS_FILE, type OpenApiDocument, openApiDocument, renderApiDocs } from './gen-api-docs.js';

export interface Finding {
  /** Relative to the checked root, posix separators. */
  file: string;
  line: number;
  message: string;
}

/**
 * Where the settings are documented for readers: every setting must be named in the first column of
 * a table under this heading of this file.
 */
export const SETTINGS_REFERENCE = { file: 'docs/configuration.md', heading: 'Configuration' } as const;

/**
 * Environment variables the docs may name that config.ts does not read: the tools' own, each with the
 * file that reads it (the check verifies the file still names it). compose.yaml's variables are read
 * from compose.yaml itself, and retired settings from config.ts (retiredSettingWarnings).
 */
export const OTHER_VARIABLES: Readonly<Record<string, string>> = {
  TEST_DATABASE_URL: 'test/support/global-setup.ts', // the tests' own Postgres
  MB_TEST_SEED: 'scripts/lib/random.ts', // replays a test run's random draws
  MB_TEST_SERVER_ONLY: 'vitest.config.ts', // only the test files that reach the database (CI's second run)
  CHAOS_SHORT: 'test/chaos/scenarios.chaos.ts', // npm run chaos -- --short
  CHAOS_SEED: 'test/chaos/scenarios.chaos.ts', // npm run chaos -- --seed N
  METERBOX_API_KEY: 'scripts/simulate.ts', // npm run simulate's default key
  METERBOX_URL: 'scripts/simulate.ts', // npm run simulate's default URL
  NODE_OPTIONS: 'Dockerfile', // Node's own; the image sets the heap flags in it
};

/** Constants of the code that the docs name (upper case like a variable), each with its module. */
export const CODE_CONSTANTS: Readonly<Record<string, string>> = {
  PARTITION_WEEKS_AHEAD: 'src/storage/maintenance.ts',
};

const HTTP_METHODS = ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'] as const;

/** The documentation files of `root` the check reads, relative, in a stable order. */
export function docFiles(root: string): string[] {
  const files = ['README.md'];
  const docs = join(root, 'docs');
  if (existsSync(docs)) {
    files.push(
      ...readdirSync(docs)
        .filter((name) => name.endsWith('.md'))
        .sort()
        .map((name) => `docs/${name}`),
    );
  }
  if (existsSync(join(root, 'CHANGELOG.md'))) files.push('CHANGELOG.md');
  return files.filter((file) => existsSync(join(root, file)));
}

// --- Markdown, as much of it as the checks need ---

interface Span {
  text: string;
  line: number;
}

interface Markdown {
  text: string;
  /** The text with fenced code blocks blanked (line breaks kept), so spans and links skip them. */
  prose: string;
  /**
   * Lines of fenced code blocks, with their line numbers. A block fenced as `text` shows output (a
   * banner, a listing), not commands: its lines are left out.
   */
  codeLines: Span[];
  /** Inline code spans outside fenced blocks (they may wrap a line, never a blank one). */
  codeSpans: Span[];
  headings: { text: string; level: number; line: number }[];
}

function lineAt(text: string, offset: number): number {
  // The offsets of the text's newlines, found once per text (the callers ask for many offsets of the
  // same text in turn: counting from the start each time was quadratic in a long page).
  if (newlines?.text !== text) {
    const at: number[] = [];
    for (let i = text.indexOf('\n'); i >= 0; i = text.indexOf('\n', i + 1)) at.push(i);
    newlines = { text, at };
  }
  // Lines before the offset's: the newlines before it.
  let lo = 0;
  let hi = newlines.at.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (newlines.at[mid]! < offset) lo = mid + 1;
    else hi = mid;
  }
  return lo + 1;
}
let newlines: { text: string; at: number[] } | undefined;

export function parseMarkdown(text: string): Markdown {
  const lines = text.split('\n');
  const codeLines: Span[] = [];
  const headings: Markdown['headings'] = [];
  const proseLines: string[] = [];
  let fence: string | undefined;
  let output = false;
  for (const [i, line] of lines.entries()) {
    const opening = /^\s*(`{3,}|~{3,})\s*(\S*)/.exec(line);
    const marker = opening?.[1];
    if (fence) {
      if (marker && marker[0] === fence[0] && marker.length >= fence.length) fence = undefined;
      else if (!output) codeLines.push({ text: line, line: i + 1 });
      proseLines.push('');
      continue;
    }
    if (marker) {
      fence = marker;
      output = opening?.[2] === 'text';
      proseLines.push('');
      continue;
    }
    proseLines.push(line);
    const heading = /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) headings.push({ level: heading[1]!.length, text: heading[2]!, line: i + 1 });
  }
  const prose = proseLines.join('\n');
  const codeSpans: Span[] = [];
  for (const m of prose.matchAll(/(`+)((?:(?!\n\s*\n)[\s\S])+?)\1/g)) {
    codeSpans.push({ text: m[2]!.replace(/\s+/g, ' ').trim(), line: lineAt(prose, m.index) });
  }
  return { text, prose, codeLines, codeSpans, headings };
}

/** GitHub's anchor of a heading: its text, lower case, punctuation dropped, spaces to hyphens. */
export function githubSlug(heading: string): string {
  return heading
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1')
    .replace(/<[^>]+>/g, '')
    .replace(/[`*]/g, '')
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

/** Every anchor a Markdown file has: its headings' slugs (repeats get -1, -2, …) and HTML ids. */
function anchorsOf(md: Markdown): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const h of md.headings) {
    const base = githubSlug(h.text);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  for (const m of md.prose.matchAll(/<a\s+(?:name|id)="([^"]+)"/g)) anchors.add(m[1]!);
  return anchors;
}

/** The rows of every table, each cell with the line it is on (escaped pipes kept inside cells). */
function tables(
  md: Markdown,
): { header: string[]; line: number; rows: { cells: string[]; line: number }[] }[] {
  const lines = md.prose.split('\n');
  const found: ReturnType<typeof tables> = [];
  const cellsOf = (line: string) =>
    line
      .trim()
      .replace(/^\||\|$/g, '')
      .split(/(?<!\\)\|/)
      .map((c) => c.trim());
  for (let i = 0; i + 1 < lines.length; i++) {
    if (!/^\s*\|/.test(lines[i]!) || !/^\s*\|?\s*:?-{3,}/.test(lines[i + 1]!)) continue;
    const table = {
      header: cellsOf(lines[i]!),
      line: i + 1,
      rows: [] as { cells: string[]; line: number }[],
    };
    let j = i + 2;
    for (; j < lines.length && /^\s*\|/.test(lines[j]!); j++)
      table.rows.push({ cells: cellsOf(lines[j]!), line: j + 1 });
    found.push(table);
    i = j;
  }
  return found;
}

/** The section of `md` under the heading `title` (to the next heading of the same or a higher level). */
function section(md: Markdown, title: string): Markdown | undefined {
  const start = md.headings.find((h) => h.text === title);
  if (!start) return undefined;
  const end = md.headings.find((h) => h.line > start.line && h.level <= start.level);
  const keep = (line: number) => line >= start.line && (end === undefined || line < end.line);
  const prose = md.prose
    .split('\n')
    .map((line, i) => (keep(i + 1) ? line : ''))
    .join('\n');
  return { ...md, prose };
}

// --- The checks ---

interface Sources {
  root: string;
  scripts: ReadonlySet<string>;
  settings: ReadonlySet<string>;
  composeVariables: ReadonlySet<string>;
  routes: ReadonlyMap<string, ReadonlySet<string>>;
}

/** `npm run <script>`, `npm start` and `npm test` name scripts of package.json. */
function checkNpmScripts(file: string, md: Markdown, sources: Sources): Finding[] {
  const findings: Finding[] = [];
  for (const m of md.text.matchAll(/\bnpm (?:run(?:-script)? ([A-Za-z][\w:.-]*)|(start|test)\b)/g)) {
    const script = m[1] ?? m[2]!;
    if (!sources.scripts.has(script)) {
      findings.push({
        file,
        line: lineAt(md.text, m.index),
        message: `\`npm ${m[1] ? 'run ' : ''}${script}\`: package.json has no script "${script}"`,
      });
    }
  }
  return findings;
}

/** The argument words of each meterbox command line the file shows, with its line. */
function commandLines(md: Markdown): Span[] {
  const found: Span[] = [];
  const invocation = /(?:^|[\s;&|(])(?:meterbox|npm run (?:--silent )?(?:dev:)?cli --)\s+(.*)$/;
  for (const span of md.codeSpans) {
    const m = /^(?:meterbox|npm run (?:--silent )?(?:dev:)?cli --)\s+(.*)$/.exec(span.text);
    if (m) found.push({ text: m[1]!, line: span.line });
  }
  for (const code of md.codeLines) {
    const withoutComment = code.text.replace(/\s#.*$/, '');
    const m = invocation.exec(withoutComment.replace(/^\s*\$\s+/, ' '));
    if (m) found.push({ text: m[1]!, line: code.line });
  }
  return found;
}

/** Each `meterbox <command …>` shown is a command of the registry, with flags it takes. */
function checkCommands(file: string, md: Markdown): Finding[] {
  const findings: Finding[] = [];
  for (const { text, line } of commandLines(md)) {
    const words = text.split(/\s+/).filter(Boolean);
    const first = words[0];
    // A placeholder (`meterbox <command>`, `npm run cli -- …`) shows the shape, not a command; the
    // general help (`meterbox --help`) is one.
    if (first === undefined || /^[<…[]|^\.\.\./.test(first)) continue;
    if (['--help', '-h', 'help'].includes(first)) continue;
    const name = [words.slice(0, 2).join(' '), first].find((candidate) => candidate in COMMANDS);
    // A group's help (`meterbox destinations --help`) lists the group's commands.
    const group = Object.keys(COMMANDS).some((n) => n.startsWith(`${first} `));
    if (!name && group && (words.length === 1 || ['--help', '-h'].includes(words[1]!))) continue;
    if (!name) {
      findings.push({ file, line, message: `\`meterbox ${text}\`: no such command in src/commands.ts` });
      continue;
    }
    const options = COMMANDS[name]!.options ?? {};
    for (const m of text.matchAll(/(?:^|[\s[(|])--([a-z][a-z0-9-]*)/g)) {
      if (m[1] !== 'help' && !(m[1]! in options)) {
        findings.push({ file, line, message: `\`meterbox ${text}\`: "meterbox ${name}" takes no --${m[1]}` });
      }
    }
  }
  return findings;
}

const VARIABLE = /\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b(?:_\*)?|\b[A-Z][A-Z0-9]*_\*/g;

/** Whether `name` is an environment variable the docs may name, and if not, why. */
function variableProblem(
  name: string,
  sources: Sources,
  knownElsewhere: ReadonlySet<string>,
): string | undefined {
  if (name.endsWith('_*')) {
    const prefix = name.slice(0, -1);
    return [...sources.settings].some((s) => s.startsWith(prefix))
      ? undefined
      : `\`${name}\`: no setting of src/config.ts starts with ${prefix}`;
  }
  if (sources.settings.has(name) || knownElsewhere.has(name)) return undefined;
  return `\`${name}\` is not a setting src/config.ts reads (nor compose.yaml's, a tool's, or a retired one)`;
}

function checkVariables(file: string, md: Markdown, sources: Sources, known: ReadonlySet<string>): Finding[] {
  const findings: Finding[] = [];
  for (const m of md.text.matchAll(VARIABLE)) {
    const problem = variableProblem(m[0], sources, known);
    if (problem) findings.push({ file, line: lineAt(md.text, m.index), message: problem });
  }
  return findings;
}

/** .env.example: each `NAME=` line is a setting, each setting has its line; commented names are known. */
function checkEnvExample(text: string, sources: Sources, known: ReadonlySet<string>): Finding[] {
  const file = '.env.example';
  const findings: Finding[] = [];
  const listed = new Set<string>();
  for (const [i, line] of text.split('\n').entries()) {
    const entry = /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(line);
    if (entry) {
      listed.add(entry[1]!);
      if (!sources.settings.has(entry[1]!)) {
        findings.push({ file, line: i + 1, message: `${entry[1]} is not a setting src/config.ts reads` });
      }
      continue;
    }
    for (const m of line.matchAll(VARIABLE)) {
      const problem = variableProblem(m[0], sources, known);
      if (problem) findings.push({ file, line: i + 1, message: problem });
    }
  }
  for (const setting of sources.settings) {
    if (!listed.has(setting)) {
      findings.push({ file, line: 1, message: `${setting} (read by src/config.ts) has no ${setting}= line` });
    }
  }
  return findings;
}

/** Every setting is named in the first column of a table of the settings reference. */
function checkSettingsReference(docs: ReadonlyMap<string, Markdown>, sources: Sources): Finding[] {
  const { file, heading } = SETTINGS_REFERENCE;
  const md = docs.get(file);
  const part = md && section(md, heading);
  if (!part) return [{ file, line: 1, message: `the settings reference (heading "${heading}") is missing` }];
  const named = new Set<string>();
  const where = part.headings.find((h) => h.text === heading)?.line ?? 1;
  for (const table of tables(part)) {
    for (const row of table.rows) {
      for (const m of (row.cells[0] ?? '').matchAll(/`([A-Z][A-Z0-9_]*)`/g)) named.add(m[1]!);
    }
  }
  return [...sources.settings]
    .filter((setting) => !named.has(setting))
    .map((setting) => ({
      file,
      line: where,
      message: `${setting} (read by src/config.ts) is not in the settings reference ("${heading}")`,
    }));
}

/** Relative links and images resolve to a file, and their #anchor to a heading of it. */
function checkLinks(
  file: string,
  md: Markdown,
  docs: ReadonlyMap<string, Markdown>,
  root: string,
): Finding[] {
  const findings: Finding[] = [];
  const targets = [
    ...md.prose.matchAll(/!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g),
    ...md.prose.matchAll(/^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$/gm),
  ];
  for (const m of targets) {
    const target = m[1]!;
    if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue;
    const line = lineAt(md.prose, m.index);
    const [path, anchor] = target.split('#', 2) as [string, string | undefined];
    const resolved =
      path === ''
        ? file
        : relative(root, resolve(root, dirname(file), decodeURI(path))).replaceAll('\\', '/');
    if (path !== '' && !existsSync(join(root, resolved))) {
      findings.push({ file, line, message: `link ${target}: ${resolved} does not exist` });
      continue;
    }
    if (anchor === undefined || anchor === '') continue;
    let targetMd = docs.get(resolved);
    if (!targetMd && resolved.endsWith('.md'))
      targetMd = parseMarkdown(readFileSync(join(root, resolved), 'utf8'));
    if (!targetMd) {
      findings.push({
        file,
        line,
        message: `link ${target}: an anchor into ${resolved}, which is not Markdown`,
      });
    } else if (!anchorsOf(targetMd).has(anchor)) {
      findings.push({
        file,
        line,
        message: `link ${target}: ${resolved} has no heading with anchor #${anchor}`,
      });
    }
  }
  return findings;
}

/** `/v1/sensors/:id`, `/v1/sensors/{id}` → `/v1/sensors/{}`; `{a,b}` expands to both. */
function normalisePaths(path: string): string[] {
  const bare = path.replace(/[?#].*$/, '').replace(/\/$/, '') || '/';
  const alternation = /\{([^{}]*,[^{}]*)\}/.exec(bare);
  if (alternation) {
    return alternation[1]!
      .split(',')
      .flatMap((alt) => normalisePaths(bare.replace(alternation[0], alt.trim())));
  }
  return [bare.replace(/:\w+|\{\w+\}/g, '{}')];
}

interface DocRoute {
  method: string | undefined;
  path: string;
  line: number;
}

/** The routes a routes table names: `METHOD /path`, `/path` (any method), or a bare `METHOD` on the last path. */
function routesOfTable(
  file: string,
  table: ReturnType<typeof tables>[number],
  findings: Finding[],
): DocRoute[] {
  const routes: DocRoute[] = [];
  for (const row of table.rows) {
    let last: string[] | undefined;
    for (const m of (row.cells[0] ?? '').matchAll(/`([^`]+)`/g)) {
      const span = m[1]!.trim();
      const full = /^([A-Z]+)\s+(\/\S*)$/.exec(span);
      if (full && (HTTP_METHODS as readonly string[]).includes(full[1]!)) {
        last = normalisePaths(full[2]!);
        for (const path of last) routes.push({ method: full[1]!, path, line: row.line });
      } else if (span.startsWith('/')) {
        last = normalisePaths(span);
        for (const path of last) routes.push({ method: undefined, path, line: row.line });
      } else if ((HTTP_METHODS as readonly string[]).includes(span) && last) {
        for (const path of last) routes.push({ method: span, path, line: row.line });
      } else if (!span.startsWith('?')) {
        findings.push({ file, line: row.line, message: `routes table: \`${span}\` is not a route` });
      }
    }
  }
  return routes;
}

/** The routes table(s) and the OpenAPI document name the same routes. */
function checkRoutes(docs: ReadonlyMap<string, Markdown>, sources: Sources): Finding[] {
  const findings: Finding[] = [];
  const documented: (DocRoute & { file: string })[] = [];
  let first: { file: string; line: number } | undefined;
  for (const [file, md] of docs) {
    for (const table of tables(md)) {
      if (table.header[0]?.toLowerCase() !== 'route') continue;
      first ??= { file, line: table.line };
      for (const route of routesOfTable(file, table, findings)) documented.push({ ...route, file });
    }
  }
  if (!first)
    return [
      { file: API_DOCS_FILE, line: 1, message: 'no routes table (a table whose first column is "route")' },
    ];
  for (const route of documented) {
    const methods = sources.routes.get(route.path);
    const shown = `${route.method ? `${route.method} ` : ''}${route.path.replaceAll('{}', '{…}')}`;
    if (!methods) {
      findings.push({
        file: route.file,
        line: route.line,
        message: `routes table: ${shown} is not in the OpenAPI document`,
      });
    } else if (route.method && !methods.has(route.method)) {
      findings.push({
        file: route.file,
        line: route.line,
        message: `routes table: ${shown}: the OpenAPI document has ${[...methods].join(', ')} on this path, not ${route.method}`,
      });
    }
  }
  for (const [path, methods] of sources.routes) {
    for (const method of methods) {
      const covered = documented.some(
        (r) => r.path === path && (r.method === undefined || r.method === method),
      );
      if (!covered) {
        findings.push({
          file: first.file,
          line: first.line,
          message: `routes table: ${method} ${path.replaceAll('{}', '{…}')} (in the OpenAPI document) is missing`,
        });
      }
    }
  }
  return findings;
}

// --- What the code says ---

/** The routes of an OpenAPI document: each normalised path with its methods. */
export function routesOf(doc: OpenApiDocument): Map<string, Set<string>> {
  const routes = new Map<string, Set<string>>();
  for (const [path, operations] of Object.entries(doc.paths)) {
    for (const p of normalisePaths(path)) {
      const methods = routes.get(p) ?? new Set<string>();
      for (const method of Object.keys(operations)) methods.add(method.toUpperCase());
      routes.set(p, methods);
    }
  }
  return routes;
}

/** The OpenAPI document's routes, from the app built on a context that never connects. */
export async function openApiRoutes(): Promise<Map<string, Set<string>>> {
  return routesOf(await openApiDocument());
}

/** The committed API reference is what the generator renders from the document, line for line. */
function checkGeneratedApiDocs(root: string, doc: OpenApiDocument): Finding[] {
  const file = API_DOCS_FILE;
  const fix = 'run `npm run docs:api` and commit the result';
  if (!existsSync(join(root, file))) return [{ file, line: 1, message: `${file} is missing: ${fix}` }];
  const committed = readFileSync(join(root, file), 'utf8').split('\n');
  const rendered = renderApiDocs(doc).split('\n');
  const length = Math.max(committed.length, rendered.length);
  for (let i = 0; i < length; i++) {
    if (committed[i] !== rendered[i]) {
      return [
        {
          file,
          line: i + 1,
          message: `differs from what \`npm run docs:api\` renders from the OpenAPI document (expected here: ${JSON.stringify((rendered[i] ?? '(end of file)').slice(0, 100))}): ${fix}`,
        },
      ];
    }
  }
  return [];
}

/** Names that are not config.ts's but are read elsewhere; a stale entry is itself a finding. */
async function otherKnownNames(
  repo: string,
  compose: ReadonlySet<string>,
): Promise<{ names: Set<string>; findings: Finding[] }> {
  const names = new Set<string>(compose);
  const findings: Finding[] = [];
  const self = 'scripts/check-docs.ts';
  for (const [name, file] of Object.entries(OTHER_VARIABLES)) {
    const path = join(repo, file);
    if (existsSync(path) && readFileSync(path, 'utf8').includes(name)) names.add(name);
    else findings.push({ file: self, line: 1, message: `OTHER_VARIABLES: ${file} no longer reads ${name}` });
  }
  for (const [name, file] of Object.entries(CODE_CONSTANTS)) {
    const module = (await import(pathToFileURL(join(repo, file)).href)) as Record<string, unknown>;
    if (name in module) names.add(name);
    else findings.push({ file: self, line: 1, message: `CODE_CONSTANTS: ${file} no longer exports ${name}` });
  }
  return { names, findings };
}

/** Every `${NAME…}` compose.yaml interpolates (Compose's own syntax). */
function composeVariables(root: string): Set<string> {
  const path = join(root, 'compose.yaml');
  const names = new Set<string>();
  if (!existsSync(path)) return names;
  const text = readFileSync(path, 'utf8');
  parseYaml(text); // a compose file that does not parse is not one to read names from
  for (const m of text.matchAll(/\$\{([A-Z_][A-Z0-9_]*)/g)) names.add(m[1]!);
  return names;
}

/**
 * Whether each commit is in the history of `repo`'s HEAD (a measured result names the commit it ran), or
 * undefined when that cannot be told: no git repository there, or a shallow clone.
 */
function commitHistory(repo: string): ((hash: string) => boolean) | undefined {
  const git = (...args: string[]) =>
    execFileSync('git', ['-C', repo, ...args], { stdio: 'pipe', maxBuffer: 256 * 1024 * 1024 }).toString();
  let history: string[];
  try {
    if (git('rev-parse', '--is-shallow-repository').trim() !== 'false') return undefined;
    // Every commit HEAD's history holds, read once: one process, not one per cited commit (80-odd
    // `git merge-base` spawns took 20-50 s a check on a loaded machine).
    history = git('rev-list', 'HEAD').split('\n').filter(Boolean).sort();
  } catch {
    return undefined;
  }
  return (hash) => {
    // The first full hash at or after the abbreviation in sorted order is the one it abbreviates, if any.
    let lo = 0;
    let hi = history.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (history[mid]! < hash) lo = mid + 1;
      else hi = mid;
    }
    return history[lo]?.startsWith(hash) ?? false;
  };
}

/** A commit the text cites (7 to 12 hex digits or all 40, with a digit and a letter): outside UUIDs. */
const COMMIT = /(?<![\w-])([0-9a-f]{7,12}|[0-9a-f]{40})(?![\w-])/g;

function checkCommits(file: string, md: Markdown, inHistory: (hash: string) => boolean): Finding[] {
  const findings: Finding[] = [];
  for (const m of md.prose.matchAll(COMMIT)) {
    const hash = m[1]!;
    if (!/[a-f]/.test(hash) || !/\d/.test(hash) || inHistory(hash)) continue;
    findings.push({
      file,
      line: lineAt(md.prose, m.index),
      message: `commit ${hash} is not in this repository's history: name the commit that holds what was run`,
    });
  }
  return findings;
}

export interface CheckOptions {
  /** Where the documentation, .env.example, package.json and compose.yaml are read (a copy in tests). */
  root: string;
  /** The repository whose files OTHER_VARIABLES and CODE_CONSTANTS name (default: this checkout). */
  repo?: string;
  /** The OpenAPI document (default: built from the app). */
  openApi?: OpenApiDocument;
}

export async function checkDocs(options: CheckOptions): Promise<Finding[]> {
  const root = resolve(options.root);
  const repo = resolve(options.repo ?? join(dirname(fileURLToPath(import.meta.url)), '..'));
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
    scripts?: Record<string, string>;
  };
  const compose = composeVariables(root);
  const openApi = options.openApi ?? (await openApiDocument());
  const sources: Sources = {
    root,
    scripts: new Set(Object.keys(pkg.scripts ?? {})),
    settings: new Set(Object.keys(configSchema.shape)),
    composeVariables: compose,
    routes: routesOf(openApi),
  };
  const other = await otherKnownNames(repo, compose);
  const known = new Set(other.names);
  const findings: Finding[] = [...other.findings];
  const docs = new Map<string, Markdown>();
  for (const file of docFiles(root)) docs.set(file, parseMarkdown(readFileSync(join(root, file), 'utf8')));
  // Retired settings: config.ts names them in a warning when one is set.
  const isRetired = (name: string) => retiredSettingWarnings({ [name]: '1' }).length > 0;
  const allText = [...docs.values()].map((md) => md.text).join('\n');
  const envExample = existsSync(join(root, '.env.example'))
    ? readFileSync(join(root, '.env.example'), 'utf8')
    : '';
  for (const m of `${allText}\n${envExample}`.matchAll(VARIABLE)) if (isRetired(m[0])) known.add(m[0]);

  const inHistory = commitHistory(repo);
  for (const [file, md] of docs) {
    findings.push(
      ...checkNpmScripts(file, md, sources),
      ...checkCommands(file, md),
      ...checkVariables(file, md, sources, known),
      ...checkLinks(file, md, docs, root),
      ...(inHistory ? checkCommits(file, md, inHistory) : []),
    );
  }
  if (envExample) findings.push(...checkEnvExample(envExample, sources, known));
  else findings.push({ file: '.env.example', line: 1, message: '.env.example is missing' });
  findings.push(
    ...checkSettingsReference(docs, sources),
    ...checkRoutes(docs, sources),
    ...checkGeneratedApiDocs(root, openApi),
  );
  return findings.sort((a, b) => a.file.localeCompare(b.file) || a.line - b.line);
}

export function formatFinding(f: Finding): string {
  return `${f.file}:${f.line}: ${f.message}`;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  // `--root DIR` checks a copy of the docs (the check's own test plants mistakes in one).
  const at = process.argv.indexOf('--root');
  const root =
    at > 0 ? resolve(process.argv[at + 1] ?? '.') : join(dirname(fileURLToPath(import.meta.url)), '..');
  const findings = await checkDocs({ root });
  for (const f of findings) console.log(formatFinding(f));
  if (findings.length > 0) {
    console.error(`docs:check: ${findings.length} finding(s)`);
    process.exit(1);
  }
  console.log(`docs:check: ${docFiles(root).join(', ')} and .env.example hold`);
}
