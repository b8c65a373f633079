// Renders a benchmark result (the JSON `npm run bench` writes) as a self-contained SVG: throughput
// pairs (raw vs meterbox, each with its ratio), p50/p99 latencies, and the delivery backlog over time.
// Usage as a script: tsx scripts/bench/chart.ts <result.json> <out.svg>
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

interface Lat {
  p50: number;
  p99: number;
}
export interface ChartInput {
  mode: string;
  machine: { nproc: number; cpuModel: string; postgres: string; node: string; date: string };
  ingestion: {
    raw: { unitsPerSecond: number; latencyMs: Lat };
    api: { unitsPerSecond: number; latencyMs: Lat };
  };
  small: { raw: { opsPerSecond: number; latencyMs: Lat }; api: { opsPerSecond: number; latencyMs: Lat } };
  outbox: {
    without: { unitsPerSecond: number; latencyMs: Lat };
    with: { unitsPerSecond: number; latencyMs: Lat };
  };
  delivery: {
    commitToAcceptanceMs: Lat;
    backlog: { series: { t: number; pendingRows: number }[] };
    loadSeconds: number;
  };
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const fmt = (n: number) => (n >= 10_000 ? `${Math.round(n / 100) / 10}k` : `${Math.round(n * 10) / 10}`);

export function renderChart(r: ChartInput): string {
  const W = 900;
  const parts: string[] = [];
  const text = (x: number, y: number, s: string, extra = '') =>
    parts.push(`<text x="${x}" y="${y}" ${extra}>${esc(s)}</text>`);
  const rect = (x: number, y: number, w: number, h: number, fill: string) =>
    parts.push(`<rect x="${x}" y="${y}" width="${Math.max(0, w)}" height="${h}" fill="${fill}"/>`);

  text(20, 28, 'meterbox benchmarks', 'font-size="18" font-weight="bold"');
  text(
    20,
    48,
    `${r.machine.nproc} cores ${r.machine.cpuModel} · Postgres ${r.machine.postgres} · Node ${r.machine.node} · ${r.machine.date.slice(0, 10)} · ${r.mode}`,
    'font-size="11" fill="#555"',
  );

  // Throughput: each pair on its own scale (the raw bar is 100%).
  text(
    20,
    80,
    'Throughput: meterbox vs raw Postgres (same table, indexes, concurrency)',
    'font-size="14" font-weight="bold"',
  );
  const pairs: [string, string, number, string, number, string, number][] = [
    [
      'batch 500',
      'raw INSERT … unnest',
      r.ingestion.raw.unitsPerSecond,
      'POST /v1/readings',
      r.ingestion.api.unitsPerSecond,
      'readings/s',
      0.5,
    ],
    [
      '1 reading/request',
      'raw 1-row tx',
      r.small.raw.opsPerSecond,
      'POST /v1/readings',
      r.small.api.opsPerSecond,
      'per s',
      0.4,
    ],
    [
      'outbox cost, batch 500',
      'outbox off',
      r.outbox.without.unitsPerSecond,
      'outbox on',
      r.outbox.with.unitsPerSecond,
      'readings/s',
      0.9,
    ],
  ];
  const barX = 330;
  const barW = 420;
  let y = 95;
  for (const [title, aName, a, bName, b, unit, goal] of pairs) {
    const max = Math.max(a, b, 1);
    const ratio = b / Math.max(a, 1);
    text(20, y + 14, title, 'font-size="12" font-weight="bold"');
    text(
      20,
      y + 30,
      `ratio ${Math.round(ratio * 100)}% (goal ≥ ${goal * 100}%)`,
      `font-size="11" fill="${ratio >= goal ? '#1a7f37' : '#cf222e'}"`,
    );
    text(180, y + 14, aName, 'font-size="11"');
    rect(barX, y + 3, (a / max) * barW, 14, '#8c959f');
    text(barX + (a / max) * barW + 6, y + 14, `${fmt(a)} ${unit}`, 'font-size="11"');
    text(180, y + 34, bName, 'font-size="11"');
    rect(barX, y + 23, (b / max) * barW, 14, '#0969da');
    text(barX + (b / max) * barW + 6, y + 34, `${fmt(b)} ${unit}`, 'font-size="11"');
    // The goal line: where the meterbox bar has to reach.
    parts.push(
      `<line x1="${barX + goal * (a / max) * barW}" y1="${y + 20}" x2="${barX + goal * (a / max) * barW}" y2="${y + 40}" stroke="#cf222e" stroke-dasharray="3,2"/>`,
    );
    y += 52;
  }

  // Latency: log scale, p50 and p99.
  y += 15;
  text(20, y, 'Latency p50 / p99 (ms, log scale)', 'font-size="14" font-weight="bold"');
  const lats: [string, Lat, number | undefined][] = [
    ['raw batch 500', r.ingestion.raw.latencyMs, undefined],
    ['API batch 500', r.ingestion.api.latencyMs, undefined],
    ['raw 1-row tx', r.small.raw.latencyMs, undefined],
    ['API 1 reading', r.small.api.latencyMs, undefined],
    ['commit → Stripe accepted', r.delivery.commitToAcceptanceMs, 2000],
  ];
  const maxLat = Math.max(...lats.map(([, l]) => l.p99), 2000, 10);
  const scale = (ms: number) => (Math.log10(Math.max(ms, 0.1)) + 1) / (Math.log10(maxLat) + 1);
  y += 10;
  for (const [name, l, goal] of lats) {
    text(20, y + 12, name, 'font-size="11"');
    rect(barX, y + 2, scale(l.p99) * barW, 12, '#9ecbff');
    rect(barX, y + 2, scale(l.p50) * barW, 12, '#0969da');
    text(barX + scale(l.p99) * barW + 6, y + 12, `${fmt(l.p50)} / ${fmt(l.p99)} ms`, 'font-size="11"');
    if (goal)
      parts.push(
        `<line x1="${barX + scale(goal) * barW}" y1="${y}" x2="${barX + scale(goal) * barW}" y2="${y + 16}" stroke="#cf222e" stroke-dasharray="3,2"/>`,
      );
    y += 20;
  }

  // Backlog over time during the delivery benchmark.
  y += 20;
  text(
    20,
    y,
    'Delivery: pending outbox rows while 100 organizations ingest at half the ceiling',
    'font-size="14" font-weight="bold"',
  );
  const series = r.delivery.backlog.series;
  const gx = 60;
  const gy = y + 15;
  const gw = 780;
  const gh = 130;
  const tMax = Math.max(1, ...series.map((s) => s.t));
  const vMax = Math.max(1, ...series.map((s) => s.pendingRows));
  parts.push(`<rect x="${gx}" y="${gy}" width="${gw}" height="${gh}" fill="none" stroke="#d0d7de"/>`);
  const pts = series.map(
    (s) => `${(gx + (s.t / tMax) * gw).toFixed(1)},${(gy + gh - (s.pendingRows / vMax) * gh).toFixed(1)}`,
  );
  parts.push(`<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="${pts.join(' ')}"/>`);
  const loadX = gx + (r.delivery.loadSeconds / tMax) * gw;
  parts.push(
    `<line x1="${loadX}" y1="${gy}" x2="${loadX}" y2="${gy + gh}" stroke="#8c959f" stroke-dasharray="4,3"/>`,
  );
  text(loadX + 4, gy + 12, 'load stops', 'font-size="10" fill="#555"');
  text(gx - 8, gy + 10, String(vMax), 'font-size="10" text-anchor="end"');
  text(gx - 8, gy + gh, '0', 'font-size="10" text-anchor="end"');
  text(gx + gw, gy + gh + 14, `${tMax} s`, 'font-size="10" text-anchor="end"');
  const height = gy + gh + 30;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${height}" viewBox="0 0 ${W} ${height}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="#fff"/>\n${parts.join('\n')}\n</svg>\n`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [input, output] = process.argv.slice(2);
  if (!input || !output) {
    console.error('usage: tsx scripts/bench/chart.ts <result.json> <out.svg>');
    process.exit(2);
  }
  writeFileSync(output, renderChart(JSON.parse(readFileSync(input, 'utf8')) as ChartInput));
}
