// Renders a soak result (the JSON `npm run bench -- --soak` writes) as a self-contained SVG: one panel
// per curve that has to stay flat — RSS, request p99, backlog, table sizes — over the run's minutes.
// Usage as a script: tsx scripts/bench/soak-chart.ts <soak.json> <out.svg>
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export interface SoakChartSample {
  t: number;
  rssMb: Record<string, number>;
  heapUsedMb: Record<string, number>;
  requests: { single: { p50: number; p99: number }; batch: { p99: number } };
  pendingRows: number;
  oldestPendingSeconds: number;
  tableBytes: Record<string, number>;
  loadAverage1m: number;
}

export interface SoakChartInput {
  settings: { durationSeconds: number };
  machine: { nproc: number; postgres: string; node: string; date: string; gitCommit: string };
  loadSeconds: number;
  samples: SoakChartSample[];
  criteria: { criterion: string; pass: boolean }[];
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const COLORS = ['#0969da', '#cf222e', '#1a7f37', '#8250df', '#bc4c00', '#57606a'];

interface Series {
  name: string;
  points: [number, number][];
  dashed?: boolean;
}

/** A nice upper bound for an axis: 1, 2 or 5 times a power of ten at or above v. */
function niceMax(v: number): number {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

export function renderSoakChart(r: SoakChartInput): string {
  const W = 900;
  const parts: string[] = [];
  const text = (x: number, y: number, s: string, extra = '') =>
    parts.push(`<text x="${x}" y="${y}" ${extra}>${esc(s)}</text>`);
  const tMax = Math.max(1, ...r.samples.map((s) => s.t));
  const loads = r.samples.map((s) => s.loadAverage1m);
  const passed = r.criteria.every((c) => c.pass);

  text(
    20,
    28,
    `meterbox soak: ${Math.round(r.loadSeconds / 60)} min of steady load`,
    'font-size="18" font-weight="bold"',
  );
  text(
    20,
    48,
    `${r.machine.nproc} cores · Postgres ${r.machine.postgres} · Node ${r.machine.node} · ${r.machine.date.slice(0, 16)} · ${r.machine.gitCommit} · load average ${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)} · ${passed ? 'all criteria pass' : 'FAILED criteria'}`,
    `font-size="11" fill="${passed ? '#555' : '#cf222e'}"`,
  );

  let y = 70;
  const panel = (title: string, unit: string, series: Series[]) => {
    const gx = 70;
    const gw = 660;
    const gh = 120;
    const gy = y + 14;
    text(20, y + 6, title, 'font-size="13" font-weight="bold"');
    const vMax = niceMax(
      Math.max(0, ...series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite)),
    );
    parts.push(`<rect x="${gx}" y="${gy}" width="${gw}" height="${gh}" fill="none" stroke="#d0d7de"/>`);
    for (const f of [0.25, 0.5, 0.75])
      parts.push(
        `<line x1="${gx}" y1="${gy + gh * f}" x2="${gx + gw}" y2="${gy + gh * f}" stroke="#eaeef2"/>`,
      );
    text(gx - 6, gy + 10, `${vMax} ${unit}`, 'font-size="10" text-anchor="end"');
    text(gx - 6, gy + gh, '0', 'font-size="10" text-anchor="end"');
    for (const m of [0.25, 0.5, 0.75, 1]) {
      const x = gx + m * gw;
      text(
        x,
        gy + gh + 12,
        `${((m * tMax) / 60).toFixed(tMax < 600 ? 1 : 0)} min`,
        'font-size="10" text-anchor="middle" fill="#555"',
      );
    }
    const loadX = gx + (r.loadSeconds / tMax) * gw;
    parts.push(
      `<line x1="${loadX}" y1="${gy}" x2="${loadX}" y2="${gy + gh}" stroke="#8c959f" stroke-dasharray="4,3"/>`,
    );
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const pts = s.points
        .filter((p) => Number.isFinite(p[1]))
        .map(
          ([t, v]) =>
            `${(gx + (t / tMax) * gw).toFixed(1)},${(gy + gh - (Math.min(v, vMax) / vMax) * gh).toFixed(1)}`,
        );
      parts.push(
        `<polyline fill="none" stroke="${color}" stroke-width="1.5"${s.dashed ? ' stroke-dasharray="5,3"' : ''} points="${pts.join(' ')}"/>`,
      );
      const last = s.points.filter((p) => Number.isFinite(p[1])).at(-1)?.[1];
      text(
        gx + gw + 10,
        gy + 12 + i * 15,
        `${s.name}${last === undefined ? '' : ` ${Math.round(last * 10) / 10}`}`,
        `font-size="11" fill="${color}"`,
      );
    });
    y = gy + gh + 30;
  };

  const procs = Object.keys(r.samples[0]?.rssMb ?? {});
  panel('Memory: RSS (solid) and V8 heap used (dashed), per process', 'MB', [
    ...procs.map((p) => ({
      name: `${p} RSS`,
      points: r.samples.map((s) => [s.t, s.rssMb[p] ?? Number.NaN] as [number, number]),
    })),
    ...procs.map((p) => ({
      name: `${p} heap`,
      dashed: true,
      points: r.samples.map((s) => [s.t, s.heapUsedMb[p] ?? Number.NaN] as [number, number]),
    })),
  ]);
  panel('Request latency per 15 s: single-reading p99 and p50, batch-500 p99', 'ms', [
    { name: 'single p99', points: r.samples.map((s) => [s.t, s.requests.single.p99]) },
    { name: 'single p50', points: r.samples.map((s) => [s.t, s.requests.single.p50]), dashed: true },
    { name: 'batch p99', points: r.samples.map((s) => [s.t, s.requests.batch.p99]) },
  ]);
  panel('Backlog: pending outbox rows', 'rows', [
    { name: 'pending rows', points: r.samples.map((s) => [s.t, s.pendingRows]) },
  ]);
  const families = Object.keys(r.samples[0]?.tableBytes ?? {});
  panel(
    'Table sizes (with indexes and TOAST)',
    'MB',
    families.map((f) => ({ name: f, points: r.samples.map((s) => [s.t, (s.tableBytes[f] ?? 0) / 2 ** 20]) })),
  );
  text(
    20,
    y - 6,
    'dashed vertical line: the load stops; after it the outbox drains',
    'font-size="10" fill="#555"',
  );
  const height = y + 4;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${height}" viewBox="0 0 ${W} ${height}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="#fff"/>\n${parts.join('\n')}\n</svg>\n`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [input, output] = process.argv.slice(2);
  if (!input || !output) {
    console.error('usage: tsx scripts/bench/soak-chart.ts <soak.json> <out.svg>');
    process.exit(2);
  }
  writeFileSync(output, renderSoakChart(JSON.parse(readFileSync(input, 'utf8')) as SoakChartInput));
}
