// The fault suite (npm run chaos [-- --short] [--only 1,2] [--seed 7], or vitest.chaos.config.ts with
// CHAOS_SHORT=1, CHAOS_SEED): real API and worker processes, an embedded Postgres we can stop, the
// Stripe emulator injecting faults. One test per scenario, each ending with the ledger check; a
// violation fails it with the organization and the amount. Every process a scenario starts is killed
// when that scenario ends, pass or fail. Short mode (CI) shortens the load phases.
//
// Why this file is long: one test a scenario, each a whole fault world (processes, faults, load) ending in its ledger check.
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import {
  buildEvent,
  createPrng,
  type StripeEmulator,
  signPayload,
  startStripeEmulator,
  subscription,
} from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { expect, onTestFinished, test } from 'vitest';
import {
  type Cluster,
  createOrgs,
  freshDatabase,
  HttpClient,
  startApi as harnessStartApi,
  startWorkerProcess as harnessStartWorkerProcess,
  type Org,
  openDatabase,
  type Proc,
  ReadingSource,
  sleep,
  startCluster,
} from '../../scripts/bench/harness.js';
import { assignInitialDestination } from '../../src/admin/destinations.js';
import { loadConfig } from '../../src/config.js';
import { createContext } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import {
  createMetronomeClient,
  ensureBillableMetrics,
  ensureCustomer,
  metronomeAlias,
} from '../../src/metering/metronome.js';
import { sendJob } from '../../src/metering/queues.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import { waitFor } from '../support/wait.js';

const short = process.env.CHAOS_SHORT === '1';
const seed = Number(process.env.CHAOS_SEED ?? '1');
if (!Number.isInteger(seed)) throw new Error(`CHAOS_SEED must be an integer, got ${process.env.CHAOS_SEED}`);
const log = (msg: string) =>
  process.stderr.write(`[chaos ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

/** Kills `proc` when the current scenario ends; a scenario that passed has stopped it already. */
function killAtEnd(proc: Proc): Proc {
  onTestFinished(() => proc.stop('SIGKILL', 5_000));
  return proc;
}

async function startApi(
  env: Record<string, string | undefined>,
): Promise<Awaited<ReturnType<typeof harnessStartApi>>> {
  const api = await harnessStartApi(env);
  killAtEnd(api.proc);
  return api;
}

async function startWorkerProcess(env: Record<string, string | undefined>, name?: string): Promise<Proc> {
  return killAtEnd(await harnessStartWorkerProcess(env, name));
}

/** Worker settings that make retries and recovery fast enough to observe within a scenario. */
const FAST_WORKER = {
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '4',
  DELIVERY_RETRY_LIMIT: '100',
  SWEEP_INTERVAL_SECONDS: '5',
  SWEEP_STALE_SECONDS: '10',
  SHUTDOWN_TIMEOUT_MS: '5000',
  STRIPE_SECRET_KEY: 'sk_test_chaos',
};

interface Outcome {
  scenario: string;
  ok: boolean;
  lines: string[];
}

interface Env {
  cluster: Cluster;
  emulator: StripeEmulator;
}

/** Waits until no outbox row is pending; returns how long that took (the ledger's level time). */
async function drained(url: string, deadlineMs: number): Promise<number> {
  const { db, pool } = openDatabase(url, 1);
  const started = Date.now();
  try {
    await waitFor(
      'every outbox row to leave pending',
      async () =>
        Number(
          (await pool.query<{ n: string }>(`SELECT count(*) AS n FROM meter_outbox WHERE status = 'pending'`))
            .rows[0]?.n,
        ) === 0,
      deadlineMs,
      250,
    );
    return Date.now() - started;
  } finally {
    await db.destroy();
  }
}

async function ledger(url: string, orgs: readonly Org[], emulator: StripeEmulator, scenario: string) {
  const { db } = openDatabase(url, 2);
  try {
    const loaded = await loadLedger(db, orgs);
    const report = checkLedger({ ...loaded, events: emulator.events() });
    return { report, text: formatReport(scenario, report) };
  } finally {
    await db.destroy();
  }
}

/** Ingests from every organization in a loop until `until()` says stop; returns the batches sent. */
function ingest(
  http: HttpClient,
  orgs: readonly Org[],
  source: ReadingSource,
  options: { batch: number; intervalMs: number; timeoutMs?: number },
  stop: { done: boolean },
) {
  const batches: {
    org: Org;
    readings: ReturnType<ReadingSource['batch']>;
    status: number;
    ms: number;
    /** The answer's body (or the transport error) when it was not a 201. */
    error?: string;
  }[] = [];
  const running = orgs.map(async (org) => {
    while (!stop.done) {
      const readings = source.batch(org, options.batch);
      const res = await http.postJson(
        '/v1/readings',
        JSON.stringify({ readings }),
        org.apiKey,
        {},
        options.timeoutMs,
      );
      batches.push({
        org,
        readings,
        status: res.status,
        ms: res.ms,
        ...(res.status === 201 ? {} : { error: res.body.slice(0, 200) }),
      });
      await sleep(options.intervalMs);
    }
  });
  return { batches, finished: Promise.all(running) };
}

// ------------------------------------------------------------------ 1. worker SIGKILLs + Stripe faults
async function scenarioKills({ cluster, emulator }: Env): Promise<Outcome> {
  const name = '1 worker SIGKILLs under Stripe faults';
  const lines: string[] = [];
  const url = await freshDatabase(cluster, 'chaos1');
  const { db } = openDatabase(url, 2);
  const orgs = await createOrgs(db, 20, 10, 'c1');
  await db.destroy();
  emulator.reset();
  emulator.setFaults(
    {
      errorRate: 0.08,
      rateLimitRate: 0.08,
      timeoutRate: 0.03,
      acceptedThen500Rate: 0.08,
      resetRate: 0.03,
      hangMs: 16_000,
      jitterMs: 50,
    },
    seed,
  );
  // The sweep at its production settings (120 s stale, every 60 s): a killed worker's keys must get
  // going again through its leases and fetched jobs (the reaper), not through a fast sweep.
  const { SWEEP_INTERVAL_SECONDS: _interval, SWEEP_STALE_SECONDS: _stale, ...productionSweep } = FAST_WORKER;
  const env = { DATABASE_URL: url, STRIPE_API_BASE: emulator.url, ...productionSweep };
  const api = await startApi({ DATABASE_URL: url });
  const workers: Proc[] = [
    await startWorkerProcess(env, 'worker-a'),
    await startWorkerProcess(env, 'worker-b'),
  ];
  const http = new HttpClient(api.url);
  const stop = { done: false };
  const load = ingest(http, orgs, new ReadingSource(), { batch: 25, intervalMs: 200 }, stop);
  const prng = createPrng(seed);
  const durationMs = short ? 20_000 : 60_000;
  const end = Date.now() + durationMs;
  let kills = 0;
  while (Date.now() < end) {
    await sleep(1_000 + prng.next() * (short ? 3_000 : 5_000));
    const i = prng.next() < 0.5 ? 0 : 1;
    workers[i]!.child.kill('SIGKILL');
    await workers[i]!.exited;
    kills++;
    // Restart at once or after a moment: both the "crash loop" and the "later restart" cases.
    await sleep(prng.next() * 1_500);
    workers[i] = await startWorkerProcess(env, `worker-${i}-${kills}`);
  }
  stop.done = true;
  await load.finished;
  emulator.setFaults({});
  const statuses = countStatuses(load.batches.map((b) => b.status));
  lines.push(
    `ingestion: ${load.batches.length} batches ${JSON.stringify(statuses)}; ${kills} worker SIGKILLs`,
  );
  let ok = true;
  if (load.batches.some((b) => b.status !== 201)) {
    ok = false;
    lines.push('  ✗ ingestion answered something other than 201 while only workers were failing');
    for (const b of load.batches.filter((x) => x.status !== 201).slice(0, 5)) {
      lines.push(`    status ${b.status} after ${Math.round(b.ms)} ms: ${b.error ?? ''}`);
    }
  }
  await drained(url, 90_000)
    .then((ms) =>
      lines.push(`ledger level ${(ms / 1000).toFixed(1)} s after the load's end (${kills} kills)`),
    )
    .catch((err: unknown) => {
      ok = false;
      lines.push(`  ✗ ${(err as Error).message}`);
    });
  const c = emulator.counters();
  lines.push(
    `Stripe calls ${c.calls}: accepted ${c.accepted}, duplicate answers ${c.duplicate}, 500 ${c.serverError}, 429 ${c.rateLimited}, timeouts ${c.timeout}, resets ${c.reset}, accepted-then-500 ${c.acceptedThen500}`,
  );
  const { report, text } = await ledger(url, orgs, emulator, name);
  lines.push(text);
  http.close();
  await Promise.all([api.proc.stop(), ...workers.map((w) => w.stop())]);
  return { scenario: name, ok: ok && report.ok, lines };
}

// ------------------------------------------------------------------ 2. Postgres stopped (crashed) and restarted
async function scenarioPostgresRestart({ cluster, emulator }: Env): Promise<Outcome> {
  const name = '2 Postgres stopped and restarted';
  const lines: string[] = [];
  const url = await freshDatabase(cluster, 'chaos2');
  const setup = openDatabase(url, 2);
  const orgs = await createOrgs(setup.db, 5, 10, 'c2');
  await setup.db.destroy();
  emulator.reset();
  emulator.setFaults({});
  const api = await startApi({ DATABASE_URL: url, LOG_LEVEL: 'warn' });
  const worker = await startWorkerProcess({
    DATABASE_URL: url,
    STRIPE_API_BASE: emulator.url,
    ...FAST_WORKER,
  });
  const pids = { api: api.proc.pid, worker: worker.pid };
  const http = new HttpClient(api.url);
  const stop = { done: false };
  // 10 s per request: anything slower during the outage counts as a hang.
  const load = ingest(
    http,
    orgs,
    new ReadingSource(),
    { batch: 50, intervalMs: 100, timeoutMs: 10_000 },
    stop,
  );
  await sleep(short ? 4_000 : 8_000);
  const outageStart = Date.now();
  // Crashed, not stopped: an immediate shutdown loses what async commits (delivery's settle,
  // synchronous_commit off) had not written to disk yet, and the ledger must still come out exact.
  log('crashing Postgres (immediate shutdown)');
  await cluster.embedded.crash();
  await sleep(short ? 5_000 : 10_000);
  log('starting Postgres again');
  await cluster.restart();
  const outageEnd = Date.now();
  // Recovery: both processes, same pids, serve and deliver again without a restart.
  const before = load.batches.length;
  await waitFor(
    'the API to store a batch again after the restart',
    () => load.batches.slice(before).some((b) => b.status === 201),
    30_000,
  ).catch(() => {});
  await sleep(short ? 4_000 : 8_000);
  stop.done = true;
  await load.finished;

  let ok = true;
  const fail = (msg: string) => {
    ok = false;
    lines.push(`  ✗ ${msg}`);
  };
  const statuses = countStatuses(load.batches.map((b) => b.status));
  lines.push(
    `ingestion: ${load.batches.length} batches ${JSON.stringify(statuses)}; outage ${Math.round((outageEnd - outageStart) / 1000)} s`,
  );
  const bad = load.batches.filter((b) => b.status !== 201 && b.status !== 503);
  if (bad.length > 0)
    fail(
      `${bad.length} answers other than 201/503: ${JSON.stringify(countStatuses(bad.map((b) => b.status)))} (-1 = no answer within 10 s or connection failure)`,
    );
  if (!load.batches.some((b) => b.status === 503)) fail('no 503 was observed during the outage');
  const after = load.batches.slice(before);
  if (!after.some((b) => b.status === 201)) fail('the API never stored a batch after Postgres came back');
  if (!api.proc.alive || api.proc.pid !== pids.api)
    fail(`the API process died: ${api.proc.output.slice(-2000)}`);
  if (!worker.alive || worker.pid !== pids.worker)
    fail(`the worker process died: ${worker.output.slice(-2000)}`);

  // All or nothing per batch, whatever the answer was.
  const check = openDatabase(url, 2);
  let half = 0;
  let storedDespite503 = 0;
  for (const b of load.batches) {
    const { rows } = await check.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM temperature_readings WHERE sensor_id = ANY($1::uuid[]) AND recorded_at = ANY($2::timestamptz[])',
      [b.readings.map((r) => r.sensorId), b.readings.map((r) => r.recordedAt)],
    );
    const n = Number(rows[0]?.n);
    if (n !== 0 && n !== b.readings.length) half++;
    if (b.status === 201 && n !== b.readings.length) half++;
    if (b.status !== 201 && n === b.readings.length) storedDespite503++;
  }
  await check.db.destroy();
  if (half > 0) fail(`${half} batches half-written or answered 201 without being stored`);
  lines.push(
    `batches all-or-nothing: ${load.batches.length - half}/${load.batches.length}; ${storedDespite503} batches committed although the client saw no 201 (billed once, as stored)`,
  );
  await drained(url, 90_000).catch((err: unknown) => fail((err as Error).message));
  const { report, text } = await ledger(url, orgs, emulator, name);
  lines.push(text);
  http.close();
  await Promise.all([api.proc.stop(), worker.stop()]);
  return { scenario: name, ok: ok && report.ok, lines };
}

// ------------------------------------------------------------------ 3. two workers, duplicated cron
async function scenarioDuplicateCron({ cluster, emulator }: Env): Promise<Outcome> {
  const name = '3 two workers and a duplicated cron';
  const lines: string[] = [];
  const url = await freshDatabase(cluster, 'chaos3');
  const setup = openDatabase(url, 2);
  const orgs = await createOrgs(setup.db, 10, 3, 'c3');
  await setup.db.destroy();
  emulator.reset();
  emulator.setFaults({});
  const env = { DATABASE_URL: url, STRIPE_API_BASE: emulator.url, METER_CRON: '* * * * *', ...FAST_WORKER };
  // Both start-up runs report the current hour for every organization: the first duplicate.
  const workers = await Promise.all([
    startWorkerProcess(env, 'worker-a'),
    startWorkerProcess(env, 'worker-b'),
  ]);
  // The duplicated cron: many firings of the hourly job at once, from another process.
  const ctx = await createContext(loadConfig({ DATABASE_URL: url, LOG_LEVEL: 'silent' }), {
    log: createLogger('silent'),
  });
  await ctx.boss.start();
  await Promise.all(Array.from({ length: 20 }, () => sendJob(ctx.boss, 'active-sensors-report', {})));
  if (!short) {
    // And the real schedule firing on both workers (METER_CRON every minute).
    const minute = 60_000 - (Date.now() % 60_000);
    log(`waiting ${Math.round(minute / 1000) + 15} s for a real cron firing on both workers`);
    await sleep(minute + 15_000);
  } else {
    await sleep(5_000);
  }
  await ctx.boss.stop({ graceful: false, close: true }).catch(() => {});
  await ctx.db.destroy();
  await drained(url, 60_000);
  let ok = true;
  const check = openDatabase(url, 2);
  const { rows } = await check.pool.query<{ organization_id: string; hour: Date; n: string; v: string }>(
    `SELECT organization_id, date_trunc('hour', occurred_at) AS hour, count(*) AS n, max(value) AS v
     FROM meter_outbox WHERE event_name = 'active_sensors' GROUP BY 1, 2`,
  );
  await check.db.destroy();
  const emitted = emulator.events({ event_name: 'active_sensors' });
  for (const org of orgs) {
    const mine = rows.filter((r) => r.organization_id === org.organizationId);
    const hours = new Set(mine.map((r) => r.hour.toISOString()));
    const dup = mine.filter((r) => Number(r.n) !== 1);
    const byHour = new Map<number, Set<string>>();
    for (const e of emitted.filter((x) => x.customer === org.customerId)) {
      const hour = Math.floor(e.timestamp / 3600);
      byHour.set(hour, (byHour.get(hour) ?? new Set()).add(e.identifier));
    }
    const stripeDup = [...byHour.values()].filter((ids) => ids.size !== 1);
    if (mine.length === 0 || dup.length > 0 || stripeDup.length > 0 || byHour.size !== hours.size) {
      ok = false;
      lines.push(
        `  ✗ org ${org.organizationId}: ${mine.length} report hours, ${dup.length} hours with more than one outbox row, ${stripeDup.length} hours with more than one accepted event`,
      );
    }
    if (mine.some((r) => Number(r.v) !== org.sensors.length)) {
      ok = false;
      lines.push(
        `  ✗ org ${org.organizationId}: reported ${mine.map((r) => r.v).join(',')} active sensors, has ${org.sensors.length}`,
      );
    }
  }
  lines.push(
    `${orgs.length} organizations: ${rows.length} active-sensor reports (org x hour), ${emitted.length} accepted by the emulator; 2 start-up runs + 20 duplicate firings${short ? '' : ' + the real cron on 2 workers'}`,
  );
  if (workers.some((w) => !w.alive)) {
    ok = false;
    lines.push('  ✗ a worker died');
  }
  await Promise.all(workers.map((w) => w.stop()));
  return { scenario: name, ok, lines };
}

// ------------------------------------------------------------------ 4. webhook storm
async function scenarioWebhookStorm({ cluster }: Env): Promise<Outcome> {
  const name = '4 webhook storm';
  const lines: string[] = [];
  const secret = 'whsec_chaos_storm_secret';
  const url = await freshDatabase(cluster, 'chaos4');
  const setup = openDatabase(url, 4);
  const orgs = await createOrgs(setup.db, 1, 1, 'c4');
  const org = orgs[0]!;
  const api = await startApi({ DATABASE_URL: url, STRIPE_WEBHOOK_SECRET: secret });
  const http = new HttpClient(api.url, 256);
  const post = (event: object) => {
    const payload = JSON.stringify(event);
    return http.send('POST', '/webhooks/stripe', payload, {
      'content-type': 'application/json',
      'stripe-signature': signPayload(payload, secret),
    });
  };
  let ok = true;
  const fail = (msg: string) => {
    ok = false;
    lines.push(`  ✗ ${msg}`);
  };
  const subId = `sub_chaos${Date.now()}`;
  const base = Math.floor(Date.now() / 1000) - 3600;
  // 200 concurrent deliveries of one event.
  const one = buildEvent(
    'customer.subscription.updated',
    subscription({ id: subId, customer: org.customerId, status: 'past_due' }),
    { created: base },
  );
  const answers = await Promise.all(Array.from({ length: 200 }, () => post(one)));
  const storm = countStatuses(answers.map((a) => a.status));
  if (answers.some((a) => a.status !== 200))
    fail(`200 concurrent deliveries answered ${JSON.stringify(storm)}`);
  // A shuffled series: the newest event (by created) must win whatever order they arrive in.
  const statuses = [
    'active',
    'past_due',
    'active',
    'unpaid',
    'active',
    'past_due',
    'trialing',
    'active',
    'past_due',
    'active',
  ] as const;
  const series = statuses.map((status, i) =>
    buildEvent(
      'customer.subscription.updated',
      subscription({ id: subId, customer: org.customerId, status }),
      { created: base + 10 + i },
    ),
  );
  const prng = createPrng(seed);
  const shuffled = [...series].sort(() => prng.next() - 0.5);
  const seriesAnswers = await Promise.all(shuffled.flatMap((e) => [post(e), post(e)]));
  if (seriesAnswers.some((a) => a.status !== 200))
    fail(`series answered ${JSON.stringify(countStatuses(seriesAnswers.map((a) => a.status)))}`);
  const events = await setup.pool.query<{ event_id: string; n: string }>(
    'SELECT event_id, count(*) AS n FROM stripe_events GROUP BY 1',
  );
  const expectedIds = new Set([one.id, ...series.map((e) => e.id)]);
  if (
    events.rows.length !== expectedIds.size ||
    events.rows.some((r) => Number(r.n) !== 1 || !expectedIds.has(r.event_id))
  )
    fail(`stripe_events holds ${events.rows.length} rows for ${expectedIds.size} distinct events`);
  const sub = await setup.pool.query<{ status: string; stripe_subscription_id: string }>(
    'SELECT status, stripe_subscription_id FROM subscriptions WHERE organization_id = $1',
    [org.organizationId],
  );
  const newest = statuses.at(-1) === 'trialing' ? 'trial' : statuses.at(-1);
  if (sub.rows[0]?.status !== newest)
    fail(`final status ${sub.rows[0]?.status}, newest event says ${newest}`);
  lines.push(
    `200 concurrent copies: ${JSON.stringify(storm)}; ${series.length} shuffled events sent twice each; stripe_events rows ${events.rows.length} (expected ${expectedIds.size}); final status ${sub.rows[0]?.status} (newest: ${newest})`,
  );
  if (!api.proc.alive) fail('the API died');
  http.close();
  await setup.db.destroy();
  await api.proc.stop();
  return { scenario: name, ok, lines };
}

// ------------------------------------------------------------------ 5. bad input
async function scenarioBadInput({ cluster }: Env): Promise<Outcome> {
  const name = '5 bad input';
  const lines: string[] = [];
  const url = await freshDatabase(cluster, 'chaos5');
  const setup = openDatabase(url, 2);
  const [org] = await createOrgs(setup.db, 1, 2, 'c5');
  const sensor = org!.sensors[0]!;
  const api = await startApi({ DATABASE_URL: url });
  // No keep-alive: after a 413 the server closes the connection mid-upload, and a reused socket
  // would turn the next case into a client-side reset instead of the server's answer.
  const http = new HttpClient(api.url, 64, false);
  const at = new Date(Date.now() - 60_000).toISOString();
  const good = { sensorId: sensor, recordedAt: at, temperatureC: 4 };
  const one = (r: Record<string, unknown>) =>
    JSON.stringify({
      readings: [good, { ...good, recordedAt: new Date(Date.now() - 1000).toISOString(), ...r }],
    });
  const cases: [string, string | Buffer][] = [
    ['malformed JSON', '{"readings": [ {"sensorId": '],
    ['not JSON at all', 'readings=1'],
    ['empty body', ''],
    ['JSON null', 'null'],
    ['array instead of object', JSON.stringify([good])],
    ['readings not an array', JSON.stringify({ readings: good })],
    ['empty batch', JSON.stringify({ readings: [] })],
    ['temperature as string', one({ temperatureC: '4.2' })],
    [
      'temperature NaN literal',
      `{"readings":[{"sensorId":"${sensor}","recordedAt":"${at}","temperatureC":NaN}]}`,
    ],
    [
      'temperature Infinity literal',
      `{"readings":[{"sensorId":"${sensor}","recordedAt":"${at}","temperatureC":Infinity}]}`,
    ],
    ['huge number', `{"readings":[{"sensorId":"${sensor}","recordedAt":"${at}","temperatureC":1e400}]}`],
    ['huge exponent string', one({ temperatureC: '9'.repeat(400) })],
    ['temperature out of range', one({ temperatureC: 10_000 })],
    ['temperature null', one({ temperatureC: null })],
    ['temperature boolean', one({ temperatureC: true })],
    ['sensorId SQL', one({ sensorId: "'; DROP TABLE temperature_readings; --" })],
    ['sensorId SQL uuid-ish', one({ sensorId: "00000000-0000-0000-0000-000000000000' OR '1'='1" })],
    ['recordedAt SQL', one({ recordedAt: "2026-01-01T00:00:00Z'); DELETE FROM sensors; --" })],
    ['recordedAt number', one({ recordedAt: 1_700_000_000 })],
    ['recordedAt far future', one({ recordedAt: '2999-01-01T00:00:00Z' })],
    ['recordedAt year 0', one({ recordedAt: '0000-01-01T00:00:00Z' })],
    ['unknown sensor', one({ sensorId: '6f1c7a52-3f1e-4a55-9a4e-0d8e4a1b2c3d' })],
    ['nested object as temperature', one({ temperatureC: { $gt: 0 } })],
    [
      // A reading whose fields exist only on a __proto__ object must not validate through the prototype.
      'fields only via __proto__',
      `{"readings":[{"__proto__":{"sensorId":"${sensor}","recordedAt":"${at}","temperatureC":4}}],"__proto__":{"polluted":true}}`,
    ],
    ['10 MB body', Buffer.alloc(10 * 1024 * 1024, 'a')],
    [
      '10 MB of valid-looking JSON',
      `{"readings":[${Array.from({ length: 110_000 }, (_, i) => JSON.stringify({ ...good, recordedAt: new Date(Date.now() - 10_000_000 + i).toISOString() })).join(',')}]}`,
    ],
    [
      '10,000 readings',
      JSON.stringify({
        readings: Array.from({ length: 10_000 }, (_, i) => ({
          sensorId: sensor,
          recordedAt: new Date(Date.now() - 1_000_000 + i).toISOString(),
          temperatureC: 4,
        })),
      }),
    ],
  ];
  let ok = true;
  const results: string[] = [];
  for (const [label, body] of cases) {
    const res = await http.postJson('/v1/readings', body as string, org!.apiKey, {}, 30_000);
    results.push(`${label}: ${res.status}`);
    if (res.status < 400 || res.status >= 500) {
      ok = false;
      lines.push(`  ✗ ${label}: answered ${res.status} ${res.body.slice(0, 200)}`);
    }
  }
  // And with a wrong key, an SQL-looking key, a missing key.
  for (const [label, key] of [
    ['SQL-looking API key', "mbx_' OR 1=1 --"],
    ['garbage API key', 'x'.repeat(5000)],
  ] as const) {
    const res = await http.postJson('/v1/readings', JSON.stringify({ readings: [good] }), key);
    results.push(`${label}: ${res.status}`);
    if (res.status !== 401) {
      ok = false;
      lines.push(`  ✗ ${label}: answered ${res.status}`);
    }
  }
  const stored = await setup.pool.query<{ r: string; o: string; s: string }>(
    `SELECT (SELECT count(*) FROM temperature_readings) AS r, (SELECT count(*) FROM meter_outbox) AS o, (SELECT count(*) FROM sensors) AS s`,
  );
  const row = stored.rows[0]!;
  if (Number(row.r) !== 0 || Number(row.o) !== 0 || Number(row.s) !== 2) {
    ok = false;
    lines.push(
      `  ✗ something was stored or lost: readings ${row.r}, outbox rows ${row.o}, sensors ${row.s} (expected 0, 0, 2)`,
    );
  }
  // The API still works afterwards.
  const after = await http.postJson('/v1/readings', JSON.stringify({ readings: [good] }), org!.apiKey);
  if (after.status !== 201) {
    ok = false;
    lines.push(`  ✗ a valid batch afterwards answered ${after.status}`);
  }
  lines.push(`${cases.length + 2} bad requests, all 4xx: ${ok}; stored: readings ${row.r}, outbox ${row.o}`);
  lines.push(`  ${results.join('; ')}`);
  http.close();
  await setup.db.destroy();
  await api.proc.stop();
  return { scenario: name, ok, lines };
}

// ------------------------------------------------------------------ 6. Metronome alone and a parallel run
/**
 * Organizations on Metronome alone and in a parallel run (Stripe billing, Metronome shadow) ingest
 * through the API while both emulators inject faults and workers are SIGKILLed; afterwards each
 * destination's ledger is exact: per organization, what it accepted (each identifier once) equals the
 * readings stored, and every outbox row of that destination is delivered.
 */
async function scenarioMetronome({ cluster, emulator }: Env): Promise<Outcome> {
  const name = '6 Metronome alone and a parallel run under faults and worker kills';
  const lines: string[] = [];
  const url = await freshDatabase(cluster, 'chaos6');
  const metronome = await startMetronomeEmulator({
    seed,
    faults: { errorRate: 0.06, rateLimitRate: 0.05, acceptedThen500Rate: 0.1, resetRate: 0.04, jitterMs: 60 },
  });
  onTestFinished(() => metronome.stop());
  const token = 'metronome-chaos-token';
  const client = createMetronomeClient({ METRONOME_BEARER_TOKEN: token, METRONOME_API_BASE: metronome.url });
  if (!client) throw new Error('no Metronome client');
  await ensureBillableMetrics(client);
  const { db } = openDatabase(url, 2);
  const orgs = await createOrgs(db, 8, 5, 'c6');
  const alone = orgs.slice(0, 4);
  const parallel = orgs.slice(4);
  for (const org of orgs) await ensureCustomer(client, { id: org.organizationId, name: org.organizationId });
  await db.transaction().execute(async (trx) => {
    for (const org of alone) await assignInitialDestination(trx, org.organizationId, 'metronome');
  });
  // The parallel run in force from the current hour's start: every reading of the scenario goes to both.
  const hourStart = new Date(Math.floor(Date.now() / 3_600_000) * 3_600_000);
  for (const org of parallel) {
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              VALUES (${org.organizationId}, 'stripe', 'billing', '-infinity'),
                     (${org.organizationId}, 'metronome', 'shadow', ${hourStart})`.execute(db);
  }
  await db.destroy();
  emulator.reset();
  emulator.setFaults(
    { errorRate: 0.08, rateLimitRate: 0.06, acceptedThen500Rate: 0.08, resetRate: 0.03, jitterMs: 50 },
    seed,
  );
  const env = {
    DATABASE_URL: url,
    STRIPE_API_BASE: emulator.url,
    METRONOME_BEARER_TOKEN: token,
    METRONOME_API_BASE: metronome.url,
    METER_CATALOG_REFRESH_SECONDS: '5',
    ...FAST_WORKER,
  };
  const api = await startApi({ DATABASE_URL: url });
  const workers: Proc[] = [
    await startWorkerProcess(env, 'worker-a'),
    await startWorkerProcess(env, 'worker-b'),
  ];
  const http = new HttpClient(api.url);
  const stop = { done: false };
  const load = ingest(http, orgs, new ReadingSource(), { batch: 20, intervalMs: 200 }, stop);
  const prng = createPrng(seed + 6);
  const end = Date.now() + (short ? 20_000 : 60_000);
  let kills = 0;
  while (Date.now() < end) {
    await sleep(1_000 + prng.next() * (short ? 3_000 : 5_000));
    const i = prng.next() < 0.5 ? 0 : 1;
    workers[i]!.child.kill('SIGKILL');
    await workers[i]!.exited;
    kills++;
    await sleep(prng.next() * 1_500);
    workers[i] = await startWorkerProcess(env, `worker-${i}-${kills}`);
  }
  stop.done = true;
  await load.finished;
  emulator.setFaults({});
  metronome.setFaults({});
  const statuses = countStatuses(load.batches.map((b) => b.status));
  lines.push(
    `${load.batches.length} batches from ${orgs.length} organizations (${alone.length} on Metronome alone, ${parallel.length} in a parallel run), ${kills} worker SIGKILLs; answers ${JSON.stringify(statuses)}`,
  );
  await drained(url, short ? 120_000 : 240_000);
  const check = openDatabase(url, 2);
  let ok = true;
  try {
    const destinations = [
      {
        destination: 'stripe' as const,
        orgs: parallel,
        events: emulator.events(),
      },
      {
        destination: 'metronome' as const,
        orgs: orgs.map((o) => ({ ...o, customerId: metronomeAlias(o.organizationId) })),
        // Metronome keeps one event per transaction_id (repeats are listed apart, as duplicates).
        events: metronome.events().map((e) => ({
          identifier: e.transaction_id,
          customer: e.customer_id,
          event_name: e.event_type,
          value: Number(e.properties.value),
        })),
      },
    ];
    for (const d of destinations) {
      const loaded = await loadLedger(check.db, d.orgs);
      const report = checkLedger({
        organizations: loaded.organizations,
        outbox: (
          await check.db
            .selectFrom('meter_outbox')
            .select(['organization_id', 'event_name', 'value', 'status', 'identifier', 'kind'])
            .where('destination', '=', d.destination)
            .execute()
        ).map((r) => ({
          organizationId: r.organization_id,
          eventName: r.event_name,
          value: Number(r.value),
          status: r.status,
          identifier: r.identifier,
          kind: r.kind,
        })),
        events: d.events,
      });
      ok &&= report.ok && report.readingsStored > 0;
      lines.push(
        formatReport(
          `${name} [${d.destination}]`,
          report,
          d.destination === 'stripe' ? 'Stripe' : 'Metronome',
        ),
      );
    }
    const unmatched = metronome.unmatched().length;
    if (unmatched > 0) {
      ok = false;
      lines.push(`  ✗ ${unmatched} Metronome events under an alias no customer has`);
    }
    const counters = metronome.counters();
    lines.push(
      `Metronome: ${counters.calls.ingest} ingest calls, ${counters.acceptedThen500} accepted-then-500, ${counters.duplicate} repeats ignored`,
    );
  } finally {
    await check.db.destroy();
  }
  http.close();
  for (const w of workers) await w.stop();
  await api.proc.stop();
  return { scenario: name, ok, lines };
}

function countStatuses(statuses: readonly number[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const s of statuses) out[s] = (out[s] ?? 0) + 1;
  return out;
}

/** One embedded Postgres and one Stripe emulator for the whole suite, stopped after the last scenario. */
const chaos = test.extend<{ env: Env }>({
  env: [
    // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
    async ({}, use) => {
      const root = join('/tmp', `meterbox-chaos-${process.pid}`);
      log(`embedded Postgres in ${root}; ${short ? 'short' : 'full'} mode, seed ${seed}`);
      const cluster = await startCluster(join(root, 'pg'));
      const emulator = await startStripeEmulator({ port: 0, seed }).catch(async (err: unknown) => {
        await cluster.stop();
        throw err;
      });
      try {
        await use({ cluster, emulator });
      } finally {
        await emulator.stop().catch(() => {});
        await cluster.stop().catch(() => {});
        rmSync(root, { recursive: true, force: true });
      }
    },
    { scope: 'file' },
  ],
});

const scenarios: [string, (e: Env) => Promise<Outcome>][] = [
  ['1 worker SIGKILLs under Stripe faults', scenarioKills],
  ['2 Postgres stopped and restarted', scenarioPostgresRestart],
  ['3 two workers and a duplicated cron', scenarioDuplicateCron],
  ['4 webhook storm', scenarioWebhookStorm],
  ['5 bad input', scenarioBadInput],
  ['6 Metronome alone and a parallel run', scenarioMetronome],
];

for (const [name, run] of scenarios) {
  chaos(name, async ({ env }) => {
    const started = Date.now();
    log(`scenario ${name}…`);
    const outcome = await run(env);
    console.log(
      `\n${outcome.ok ? 'PASS' : 'FAIL'} ${outcome.scenario} (${Math.round((Date.now() - started) / 1000)} s)\n${outcome.lines.map((l) => `  ${l}`).join('\n')}`,
    );
    expect(outcome.ok, outcome.lines.join('\n')).toBe(true);
  });
}
