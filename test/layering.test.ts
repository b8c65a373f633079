// The layering of src/ (docs/architecture.md, "The folders"), checked on every relative import:
// a folder (or a top-level file) may import only from layers below its own, so features never
// reach their composers and no two folders depend on each other.
import { readdirSync, readFileSync } from 'node:fs';
import { join, posix, relative, resolve } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

/**
 * The rule table, lowest layer first. A unit is a folder of src/ or a file directly in src/ (named
 * without its extension). Units may import from any lower layer, never from their own layer or above.
 */
const LAYERS: readonly (readonly string[])[] = [
  // Base: no meterbox imports at all (the Stripe emulator is the workspace package packages/stripe-emulator).
  ['clock', 'log', 'config'],
  ['db'],
  ['observability', 'credentials'],
  // The interface every feature receives; the composition root implements it.
  ['context-type'],
  // Shared plumbing: HTTP errors, validation, types, OpenAPI, auth, listener; the CLI command shape.
  ['http', 'cli'],
  // Features, each calling only the ones below it.
  ['billing'],
  ['metering'],
  // Storage over time (partitions, retention, compaction): ageing data is not metering; its job is
  // scheduled through the one queue registry (metering/queues.ts).
  ['storage'],
  // Alerts and outgoing webhooks (issue 45): threshold counting joins ingestion's statement, so below it.
  ['alerts'],
  ['ingest'],
  ['admin'],
  // Composers: the composition root, the HTTP API, the worker, the CLI registry, the migrate step.
  ['context'],
  ['api'],
  ['worker', 'commands', 'migrations'],
  // Entry points.
  ['bin'],
];

const SRC = resolve(import.meta.dirname, '../src');

interface ImportEdge {
  /** File path relative to src/, posix separators. */
  file: string;
  line: number;
  specifier: string;
  from: string;
  to: string;
}

/** The unit of a path relative to src/: its first folder, or the file's name without extension. */
function unitOf(path: string): string {
  const [first, ...rest] = path.split('/');
  return rest.length > 0 ? first! : first!.replace(/\.(?:[cm]?[jt]sx?)$/, '');
}

/** Every relative import, re-export and dynamic import of one source file that crosses units. */
function crossUnitImports(file: string, source: string): ImportEdge[] {
  const edges: ImportEdge[] = [];
  const info = ts.preProcessFile(source, true, true);
  for (const imported of info.importedFiles) {
    const specifier = imported.fileName;
    if (!specifier.startsWith('./') && !specifier.startsWith('../')) continue;
    const target = posix.normalize(posix.join(posix.dirname(file), specifier));
    const from = unitOf(file);
    const to = unitOf(target);
    if (from === to) continue;
    const line = source.slice(0, imported.pos).split('\n').length;
    edges.push({ file, line, specifier, from, to });
  }
  return edges;
}

const rank = new Map(LAYERS.flatMap((units, layer) => units.map((unit) => [unit, layer] as const)));

/** Human-readable breaches of the table: unknown units and imports that do not point downward. */
function violations(edges: readonly ImportEdge[], units: Iterable<string>): string[] {
  const found: string[] = [];
  for (const unit of units) {
    if (!rank.has(unit)) found.push(`src/${unit} is not in the layer table (test/layering.test.ts)`);
  }
  for (const edge of edges) {
    const from = rank.get(edge.from);
    const to = rank.get(edge.to);
    if (from === undefined || to === undefined || to < from) continue;
    const why = to === from ? 'same layer' : 'upward';
    found.push(
      `src/${edge.file}:${edge.line} imports '${edge.specifier}' (${edge.from} -> ${edge.to}, ${why})`,
    );
  }
  return found;
}

/** The shortest way from the first (by name) unit of a strongly connected component back to it. */
function shortestCycle(
  graph: ReadonlyMap<string, ReadonlySet<string>>,
  component: ReadonlySet<string>,
): string[] {
  const start = [...component].sort()[0]!;
  const previous = new Map<string, string>();
  const queue = [start];
  for (let i = 0; i < queue.length; i++) {
    const unit = queue[i]!;
    for (const to of [...graph.get(unit)!].sort()) {
      if (!component.has(to) || previous.has(to)) continue;
      previous.set(to, unit);
      if (to === start) {
        const path: string[] = [];
        for (let at = unit; at !== start; at = previous.get(at)!) path.unshift(at);
        return [start, ...path, start];
      }
      queue.push(to);
    }
  }
  return [...component, start];
}

/** Cycles between units, each as a path `a -> b -> a` (one per strongly connected component). */
function cycles(edges: readonly ImportEdge[]): string[] {
  const graph = new Map<string, Set<string>>();
  for (const { from, to } of edges) {
    if (!graph.has(from)) graph.set(from, new Set());
    if (!graph.has(to)) graph.set(to, new Set());
    graph.get(from)!.add(to);
  }
  // Tarjan's algorithm: a component of more than one unit holds a cycle.
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[] = [];
  let next = 0;
  const visit = (unit: string): void => {
    index.set(unit, next);
    low.set(unit, next);
    next++;
    stack.push(unit);
    onStack.add(unit);
    for (const to of graph.get(unit)!) {
      if (!index.has(to)) {
        visit(to);
        low.set(unit, Math.min(low.get(unit)!, low.get(to)!));
      } else if (onStack.has(to)) low.set(unit, Math.min(low.get(unit)!, index.get(to)!));
    }
    if (low.get(unit) !== index.get(unit)) return;
    const component: string[] = [];
    let member: string;
    do {
      member = stack.pop()!;
      onStack.delete(member);
      component.push(member);
    } while (member !== unit);
    if (component.length > 1) found.push(shortestCycle(graph, new Set(component)).join(' -> '));
  };
  for (const unit of [...graph.keys()].sort()) if (!index.has(unit)) visit(unit);
  return found;
}

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(path);
    return /\.tsx?$/.test(entry.name) && !entry.name.endsWith('.d.ts') ? [path] : [];
  });
}

function scan(): { edges: ImportEdge[]; units: Set<string> } {
  const edges: ImportEdge[] = [];
  const units = new Set<string>();
  for (const path of sourceFiles(SRC)) {
    const file = relative(SRC, path).split(/[\\/]/).join('/');
    units.add(unitOf(file));
    edges.push(...crossUnitImports(file, readFileSync(path, 'utf8')));
  }
  return { edges, units };
}

describe('layering of src/', () => {
  const { edges, units } = scan();

  it('finds the imports it checks', () => {
    // A scan that read nothing would pass every rule below.
    expect(units.has('metering')).toBe(true);
    expect(edges.some((e) => e.from === 'ingest' && e.to === 'metering')).toBe(true);
  });

  it('has every import point to a lower layer', () => {
    expect(violations(edges, units)).toEqual([]);
  });

  it('has no cycle between folders', () => {
    expect(cycles(edges)).toEqual([]);
  });

  it('refuses a feature importing its composer, a same-layer import and an unknown folder', () => {
    const added = [
      ...crossUnitImports('metering/example.ts', "import type { Context } from '../context.js';\n"),
      ...crossUnitImports('http/example.ts', "export { x } from '../cli/command.js';\n"),
      ...crossUnitImports('ingest/example.ts', "const m = await import('../admin/outbox.js');\n"),
    ];
    expect(violations(added, ['metering', 'http', 'ingest', 'reports'])).toEqual([
      'src/reports is not in the layer table (test/layering.test.ts)',
      "src/metering/example.ts:1 imports '../context.js' (metering -> context, upward)",
      "src/http/example.ts:1 imports '../cli/command.js' (http -> cli, same layer)",
      "src/ingest/example.ts:1 imports '../admin/outbox.js' (ingest -> admin, upward)",
    ]);
  });

  it('names the folders of a cycle in import order', () => {
    const pair = [
      ...crossUnitImports('ingest/a.ts', "import { b } from '../metering/b.js';\n"),
      ...crossUnitImports('metering/b.ts', "import { a } from '../ingest/a.js';\n"),
    ];
    expect(cycles(pair)).toEqual(['ingest -> metering -> ingest']);
    const ring = [
      ...crossUnitImports('ingest/a.ts', "import { b } from '../metering/b.js';\n"),
      ...crossUnitImports('metering/b.ts', "import type { C } from '../billing/c.js';\n"),
      ...crossUnitImports('billing/c.ts', "import { a } from '../ingest/a.js';\n"),
      ...crossUnitImports('billing/d.ts', "import { log } from '../log.js';\n"),
    ];
    expect(cycles(ring)).toEqual(['billing -> ingest -> metering -> billing']);
  });
});

/** Every relative import of the files under `root`, file to file (paths without extension). */
function fileImports(root: string): ImportEdge[] {
  const strip = (path: string) => path.replace(/\.(?:[cm]?[jt]sx?)$/, '');
  return sourceFiles(root).flatMap((path) => {
    const file = relative(root, path).split(/[\\/]/).join('/');
    const source = readFileSync(path, 'utf8');
    return ts
      .preProcessFile(source, true, true)
      .importedFiles.filter((i) => i.fileName.startsWith('./') || i.fileName.startsWith('../'))
      .map((i) => ({
        file,
        line: source.slice(0, i.pos).split('\n').length,
        specifier: i.fileName,
        from: strip(file),
        to: strip(posix.normalize(posix.join(posix.dirname(file), i.fileName))),
      }));
  });
}

describe('files that import each other', () => {
  // A circle of files, type-only imports included, is two files that can only be read together (issue
  // 47): the shared part belongs in a file both import.
  const roots = [
    SRC,
    ...['stripe-emulator', 'metronome-emulator'].map((p) => resolve(SRC, `../packages/${p}/src`)),
  ];

  it('has no circle in src/ or the emulators', () => {
    for (const root of roots) {
      const edges = fileImports(root);
      expect(edges.length).toBeGreaterThan(20);
      expect(cycles(edges), relative(resolve(SRC, '..'), root)).toEqual([]);
    }
  });
});

describe('scripts/', () => {
  // Developer tools (bench, chaos launcher, simulate) run outside vitest: what they share with the
  // tests lives in scripts/lib/, which the test kit re-uses, never the other way round.
  const SCRIPTS = resolve(import.meta.dirname, '../scripts');
  const files = readdirSync(SCRIPTS, { recursive: true, encoding: 'utf8' })
    .filter((name) => /\.(?:tsx?|[cm]?js)$/.test(name) && !name.endsWith('.d.ts'))
    .map((name) => join(SCRIPTS, name));
  const imports = files.flatMap((path) =>
    ts
      .preProcessFile(readFileSync(path, 'utf8'), true, true)
      .importedFiles.map((i) => ({ file: relative(SCRIPTS, path), specifier: i.fileName })),
  );

  it('never import the test tree or vitest', () => {
    expect(imports.some((i) => i.specifier.includes('/src/'))).toBe(true);
    const intoTests = imports.filter(
      (i) => i.specifier === 'vitest' || /^(\.\.\/)+test\//.test(posix.normalize(i.specifier)),
    );
    expect(intoTests).toEqual([]);
  });
});
