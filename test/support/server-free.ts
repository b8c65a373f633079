// Which test files never reach the run's database server. CI runs the integration files a second time
// against another Postgres major (.ci/run, MB_TEST_SERVER_ONLY=1); a file that never opens a connection
// to the run's server would run exactly as it did the first time, so that run leaves it out
// (vitest.config.ts). The rule is read off the code, not kept as a list: a file reaches the server when
// anything it imports, directly or through other files of the repository, dynamic imports included,
// injects the per-file database kit's inputs (the server's address pgAdminUrl, the template pgTemplate)
// or reads the server's address from the environment. A relative import that cannot be resolved counts as reaching it (a file is left
// out only when it is known to be free). Packages (node_modules, the emulators' workspace packages)
// never reach the test server: they are not followed.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import ts from 'typescript';

/** Text that puts a file on the run's database server. */
const REACHES_SERVER = /\binject\(\s*['"](?:pgAdminUrl|pgTemplate)['"]|\bTEST_DATABASE_URL\b/;

/** The file a relative specifier names (`./x.js` is `./x.ts` in the sources), or undefined. */
function resolveRelative(from: string, specifier: string): string | undefined {
  const base = resolve(dirname(from), specifier);
  const candidates = [
    base,
    base.replace(/\.js$/, '.ts'),
    base.replace(/\.js$/, '.tsx'),
    base.replace(/\.mjs$/, '.mts'),
    `${base}.ts`,
    join(base, 'index.ts'),
  ];
  return candidates.find((candidate) => existsSync(candidate) && statSync(candidate).isFile());
}

/** What one file says for itself: whether its text reaches the server, and the files it imports. */
interface FileFacts {
  reaches: boolean;
  imports: string[];
}

function factsOf(file: string): FileFacts {
  const text = readFileSync(file, 'utf8');
  if (REACHES_SERVER.test(text)) return { reaches: true, imports: [] };
  if (!/\.(?:ts|tsx|mts|js|mjs)$/.test(file)) return { reaches: false, imports: [] };
  const imports: string[] = [];
  for (const { fileName } of ts.preProcessFile(text, true, true).importedFiles) {
    if (!fileName.startsWith('.')) continue;
    const target = resolveRelative(file, fileName);
    // Unresolved: not known to be free.
    if (target === undefined) return { reaches: true, imports: [] };
    imports.push(target);
  }
  return { reaches: false, imports };
}

/**
 * The files, of those given, that do not reach the server; files are absolute or relative to `root`,
 * and the answer keeps the form they were given in.
 */
export function serverFreeFiles(root: string, files: readonly string[]): string[] {
  const facts = new Map<string, FileFacts>();
  const factsFor = (file: string): FileFacts => {
    let known = facts.get(file);
    if (known === undefined) {
      known = factsOf(file);
      facts.set(file, known);
    }
    return known;
  };
  const reaches = (start: string): boolean => {
    const seen = new Set<string>([start]);
    const stack = [start];
    for (let file = stack.pop(); file !== undefined; file = stack.pop()) {
      const { reaches: itself, imports } = factsFor(file);
      if (itself) return true;
      for (const next of imports) {
        if (seen.has(next)) continue;
        seen.add(next);
        stack.push(next);
      }
    }
    return false;
  };
  return files.filter((file) => !reaches(isAbsolute(file) ? file : resolve(root, file)));
}
