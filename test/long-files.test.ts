// Files that read as small as their idea (issue 47): a source or test file under src/, scripts/, test/ or
// packages/*/src longer than MAX_LINES says why in its first lines, in a comment that starts with
// `Why this file is long:` and gives the reason; a long file with no reason is split or explained.
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const MAX_LINES = 400;
/** The reason stands among a file's first lines: a reader sees it before the code. */
const REASON_WITHIN = 30;
const REASON = /^\s*(?:\/\/|\*|\/\*\*?)\s*Why this file is long: *(\S.{15,})$/;

const ROOT = resolve(import.meta.dirname, '..');

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === 'node_modules' ? [] : sourceFiles(path);
    return /\.(?:[cm]?[jt]sx?)$/.test(entry.name) && !entry.name.endsWith('.d.ts') ? [path] : [];
  });
}

/** The long files among `files` that give no reason, each as `path (lines)`. */
function unexplainedLongFiles(files: readonly { path: string; text: string }[]): string[] {
  return files.flatMap(({ path, text }) => {
    const lines = text.replace(/\n$/, '').split('\n');
    if (lines.length <= MAX_LINES) return [];
    return lines.slice(0, REASON_WITHIN).some((line) => REASON.test(line))
      ? []
      : [`${path} (${lines.length} lines)`];
  });
}

function checkedFiles(): { path: string; text: string }[] {
  const packages = readdirSync(join(ROOT, 'packages')).map((name) => join(ROOT, 'packages', name, 'src'));
  return [join(ROOT, 'src'), join(ROOT, 'scripts'), join(ROOT, 'test'), ...packages].flatMap((dir) =>
    sourceFiles(dir).map((path) => ({ path: relative(ROOT, path), text: readFileSync(path, 'utf8') })),
  );
}

describe('long source files', () => {
  it(`has every file over ${MAX_LINES} lines say why in its first ${REASON_WITHIN}`, () => {
    const files = checkedFiles();
    // A scan that read nothing, or no long file, would pass without checking anything.
    expect(files.some((f) => f.path.startsWith('packages/'))).toBe(true);
    expect(files.filter((f) => f.text.split('\n').length > MAX_LINES).length).toBeGreaterThan(5);
    expect(unexplainedLongFiles(files)).toEqual([]);
  });

  it('refuses a long file without a reason, or with an empty one, or one given too late', () => {
    const body = (n: number) => Array.from({ length: n }, (_, i) => `export const x${i} = ${i};`);
    const reason = '// Why this file is long: one state machine whose cases read together.';
    const files = [
      { path: 'short.ts', text: body(MAX_LINES).join('\n') },
      { path: 'explained.ts', text: ['// The job.', reason, ...body(MAX_LINES)].join('\n') },
      { path: 'in-a-block.ts', text: ['/**', ` * ${reason.slice(3)}`, ' */', ...body(MAX_LINES)].join('\n') },
      { path: 'silent.ts', text: body(MAX_LINES + 1).join('\n') },
      { path: 'empty.ts', text: ['// Why this file is long:', ...body(MAX_LINES)].join('\n') },
      { path: 'late.ts', text: [...body(REASON_WITHIN), reason, ...body(MAX_LINES)].join('\n') },
    ];
    expect(unexplainedLongFiles(files)).toEqual([
      'silent.ts (401 lines)',
      'empty.ts (401 lines)',
      `late.ts (${REASON_WITHIN + 1 + MAX_LINES} lines)`,
    ]);
  });
});
