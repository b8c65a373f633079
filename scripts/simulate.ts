// npm run simulate -- --url http://127.0.0.1:3000 --key mbx_… [--sensors 50] [--rate 200] [--batch 50]
//   [--duration 60]
// Streams readings from many virtual sensors to a running meterbox with a live progress line.
// Sensors are registered through the API on first use (one set per --prefix).
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    url: { type: 'string', default: process.env.METERBOX_URL ?? 'http://127.0.0.1:3000' },
    key: { type: 'string', default: process.env.METERBOX_API_KEY },
    sensors: { type: 'string', default: '50' },
    rate: { type: 'string', default: '200' },
    batch: { type: 'string', default: '50' },
    duration: { type: 'string', default: '60' },
    prefix: { type: 'string', default: 'sim' },
    help: { type: 'boolean', short: 'h', default: false },
  },
});

/** The demo API key `npm start` keeps in its data directory, if there is one. */
function demoKey(): string | undefined {
  const file = join(process.env.DEV_DATA_DIR ?? '.data', 'dev-secrets.json');
  if (!existsSync(file)) return undefined;
  try {
    const saved = JSON.parse(readFileSync(file, 'utf8')) as { demoApiKey?: unknown };
    return typeof saved.demoApiKey === 'string' ? saved.demoApiKey : undefined;
  } catch {
    return undefined;
  }
}

const USAGE = `usage: npm run simulate -- [--key <api key>] [--url URL] [--sensors N] [--rate N] [--batch N]
                            [--duration S] [--prefix NAME]
  --key       API key (default: METERBOX_API_KEY, else the demo key npm start keeps in .data/)
  --url       API base URL (default: METERBOX_URL, else http://127.0.0.1:3000)
  --sensors   virtual sensors, created once under --prefix (default 50)
  --rate      readings per second (default 200)
  --batch     readings per request (default 50)
  --duration  seconds to run (default 60); Ctrl-C stops early and prints the summary
  --prefix    sensor name prefix (default sim)`;
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
values.key ??= demoKey();
if (!values.key) {
  console.error(USAGE);
  console.error('(npm start prints a demo API key)');
  process.exit(2);
}
const base = values.url!.replace(/\/$/, '');
const headers = { authorization: `Bearer ${values.key}`, 'content-type': 'application/json' };
const sensorCount = Number(values.sensors);
const ratePerSecond = Number(values.rate);
const batchSize = Math.max(1, Number(values.batch));
const durationMs = Number(values.duration) * 1000;

async function api<T>(method: string, path: string, body?: unknown): Promise<{ status: number; json: T }> {
  const res = await fetch(`${base}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, json: (await res.json()) as T };
}

interface SensorRow {
  id: string;
  name: string;
  active: boolean;
}

async function ensureSensors(): Promise<string[]> {
  const existing = await api<{ sensors?: SensorRow[]; data?: SensorRow[] }>(
    'GET',
    '/v1/sensors?active=true&limit=1000',
  );
  if (existing.status !== 200)
    throw new Error(`GET /v1/sensors answered ${existing.status}: ${JSON.stringify(existing.json)}`);
  const list = existing.json.sensors ?? existing.json.data ?? [];
  const ours = list.filter((s) => s.active && s.name.startsWith(`${values.prefix}-`)).map((s) => s.id);
  for (let i = ours.length; i < sensorCount; i++) {
    const created = await api<{ id?: string; sensor?: { id: string } }>('POST', '/v1/sensors', {
      name: `${values.prefix}-${i}`,
    });
    const id = created.json.id ?? created.json.sensor?.id;
    if (created.status !== 201 || !id) throw new Error(`POST /v1/sensors answered ${created.status}`);
    ours.push(id);
  }
  return ours.slice(0, sensorCount);
}

const sensors = await ensureSensors();
const stats = { requests: 0, inserted: 0, duplicates: 0, errors: 0, lastError: '' };
const started = Date.now();
let sent = 0;
let cursor = 0;

function progress(final = false): void {
  const seconds = (Date.now() - started) / 1000;
  const line =
    `${seconds.toFixed(0).padStart(4)}s  requests ${stats.requests}  inserted ${stats.inserted}` +
    `  duplicates ${stats.duplicates}  errors ${stats.errors}  ${(stats.inserted / Math.max(seconds, 0.001)).toFixed(0)} readings/s` +
    (stats.lastError ? `  last error: ${stats.lastError}` : '');
  process.stderr.write(`\r${line.padEnd(110)}${final ? '\n' : ''}`);
}
const ticker = setInterval(progress, 250);

// Ctrl-C ends the run early with the same summary as a run that reached --duration.
let interrupted = false;
process.once('SIGINT', () => {
  interrupted = true;
});

while (!interrupted && Date.now() - started < durationMs) {
  const due = Math.floor(((Date.now() - started) / 1000) * ratePerSecond) - sent;
  if (due < batchSize) {
    await new Promise((r) => setTimeout(r, 20));
    continue;
  }
  const readings = Array.from({ length: batchSize }, () => {
    const sensorId = sensors[cursor++ % sensors.length]!;
    // Unique instants per sensor: millisecond clock plus the cursor keeps them distinct.
    return {
      sensorId,
      recordedAt: new Date(Date.now() - 1000 + (cursor % 1000)).toISOString(),
      temperatureC: Math.round((2 + Math.random() * 6) * 10) / 10,
    };
  });
  sent += batchSize;
  type Answer = { inserted?: number; duplicates?: number; error?: { message: string } };
  const res = await api<Answer>('POST', '/v1/readings', { readings }).catch(
    (err: Error): { status: number; json: Answer } => ({
      status: 0,
      json: { error: { message: err.message } },
    }),
  );
  stats.requests++;
  if (res.status === 201) {
    stats.inserted += res.json.inserted ?? 0;
    stats.duplicates += res.json.duplicates ?? 0;
  } else {
    stats.errors++;
    stats.lastError = `${res.status} ${res.json.error?.message ?? ''}`.slice(0, 60);
  }
}
clearInterval(ticker);
progress(true);
const seconds = (Date.now() - started) / 1000;
console.log(
  [
    `simulate ${interrupted ? 'interrupted (Ctrl-C)' : 'finished'} after ${seconds.toFixed(1)} s`,
    `  requests   ${stats.requests} (${(stats.requests / Math.max(seconds, 0.001)).toFixed(1)}/s)`,
    `  inserted   ${stats.inserted} readings (${(stats.inserted / Math.max(seconds, 0.001)).toFixed(0)}/s)`,
    `  duplicates ${stats.duplicates}`,
    `  errors     ${stats.errors}${stats.lastError ? ` (last: ${stats.lastError})` : ''}`,
    `  sensors    ${sensors.length} (${values.prefix}-*)`,
  ].join('\n'),
);
process.exit(stats.errors > 0 && stats.inserted === 0 ? 1 : 0);
