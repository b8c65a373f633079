// Where a V8 CPU profile (node --cpu-prof) spends its samples, as self time per package or area
// (hono, pg, zod, pino, node:net, meterbox's own code, GC, idle) and per function: the API's split
// for docs/benchmarks.md without opening DevTools. `npx tsx scripts/bench/cpu-profile.ts <file>`.
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface Profile {
  startTime: number;
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/** The area a frame belongs to: a package under node_modules, a node: module, V8's pseudo-frames, or meterbox. */
function areaOf(url: string, functionName: string): string {
  if (!url) return functionName.startsWith('(') ? functionName : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (pkg) return pkg[1]!;
  if (url.startsWith('node:'))
    return url
      .replace(/^node:(internal\/)?/, 'node:')
      .split('/')
      .slice(0, 2)
      .join('/');
  return 'meterbox';
}

export interface ProfileSplit {
  totalMs: number;
  byArea: { area: string; ms: number; share: number }[];
  byFunction: { fn: string; ms: number; share: number }[];
}

/**
 * `window`: only the samples taken within [fromUs, toUs] of the monotonic clock (CLOCK_MONOTONIC in
 * microseconds, which V8's profile timestamps are on: process.hrtime.bigint() / 1000n in the caller).
 */
export function summarizeCpuProfile(
  file: string,
  top = 15,
  window?: { fromUs: number; toUs: number },
): ProfileSplit {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  let at = profile.startTime;
  for (const [i, id] of profile.samples.entries()) {
    const delta = profile.timeDeltas[i] ?? 0;
    at += delta;
    if (window && (at < window.fromUs || at > window.toUs)) continue;
    selfUs.set(id, (selfUs.get(id) ?? 0) + delta);
  }
  const areas = new Map<string, number>();
  const fns = new Map<string, number>();
  let total = 0;
  for (const [id, us] of selfUs) {
    const node = byId.get(id);
    if (!node) continue;
    const { url, functionName, lineNumber } = node.callFrame;
    const area = areaOf(url, functionName);
    areas.set(area, (areas.get(area) ?? 0) + us);
    const fn = `${functionName || '(anonymous)'} ${url ? `${url.split('/').slice(-2).join('/')}:${lineNumber + 1}` : ''}`;
    fns.set(fn, (fns.get(fn) ?? 0) + us);
    total += us;
  }
  const rank = <K extends string>(m: Map<string, number>, key: K) =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([k, us]) => ({
        [key]: k,
        ms: Math.round(us / 1000),
        share: Math.round((1000 * us) / total) / 10,
      }));
  return {
    totalMs: Math.round(total / 1000),
    byArea: rank(areas, 'area') as ProfileSplit['byArea'],
    byFunction: rank(fns, 'fn') as ProfileSplit['byFunction'],
  };
}

if (process.argv[1]?.endsWith('cpu-profile.ts') && process.argv[2]) {
  const split = summarizeCpuProfile(process.argv[2], Number(process.argv[3] ?? 20));
  console.log(`total ${split.totalMs} ms of samples`);
  for (const a of split.byArea) console.log(`  ${String(a.share).padStart(5)}%  ${a.area}`);
  console.log('functions (self time):');
  for (const f of split.byFunction) console.log(`  ${String(f.share).padStart(5)}%  ${f.fn}`);
}
