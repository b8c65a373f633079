// npm run bench -- --scale [--quick] [--destination metronome] [--out bench-results/scale.json]
// Delivery at platform scale (issue 12): 1,000 and 10,000 billable customers, single-reading
// requests spread across them at a fixed rate (open loop), one worker process (the production
// bundle, default settings), the in-process Stripe emulator answering each call in 0-500 ms
// (uniform) and enforcing the account-wide limit of the scenario. Per scenario: the start-up
// active_sensors run, backlog every second, commit -> acceptance p50/p99, calls/s against the
// budget, share of 429s, drain time after the load, and the exactly-once ledger check.
// --destination metronome: every organization bills to Metronome (organization_destinations), the
// in-process Metronome emulator answering each ingest call in 0-500 ms; the same measurements, the
// ledger against Metronome's accepted events per ingest alias.
//
// Why this file is long: one benchmark from setup to report (1,000 and 10,000 customers per destination, job
// states, statements); a developer tool read as a whole.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { type MetronomeEmulator, startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { pollUntil } from '../lib/poll.js';
import { seededRandom } from '../lib/random.js';
import {
  benchRole,
  buildEntries,
  createOrgs,
  freshDatabase,
  HttpClient,
  latencySummary,
  type Org,
  openDatabase,
  pendingOutbox,
  ReadingSource,
  ROOT,
  sleep,
  startApi,
  startCluster,
  startWorkerProcess,
} from './harness.js';

interface Scenario {
  name: string;
  customers: number;
  transport: 'v1' | 'v2';
  /** The emulator's account-wide limit: calls/s (v1) or requests/s (v2). */
  limit: number;
  /** Live key (budget default 800/s) or test key (default 25/s). */
  live: boolean;
  /** Single-reading requests per second during the load (default --rate, 150). */
  rate?: number;
  /** Where every organization bills (default Stripe). */
  destination?: 'stripe' | 'metronome';
}

const { values: args } = parseArgs({
  options: {
    scale: { type: 'boolean', default: true },
    quick: { type: 'boolean', default: false },
    out: { type: 'string' },
    rate: { type: 'string' },
    only: { type: 'string' },
    // pg_stat_statements on: prints each scenario's costliest statements (and stores them in the JSON).
    profile: { type: 'boolean', default: false },
    // Events/s of one worker draining a preloaded backlog, at 0 ms and at 0-500 ms Stripe latency.
    throughput: { type: 'boolean', default: false },
    // One line per second during the load: backlog, calls/s, job states.
    verbose: { type: 'boolean', default: false },
    // Writes a V8 CPU profile of the worker to bench-results/cpu-prof/ (open in Chrome DevTools).
    'worker-cpu-prof': { type: 'boolean', default: false },
    // stripe (the scenarios above) or metronome (10k customers billed to Metronome).
    destination: { type: 'string', default: 'stripe' },
  },
});
const quick = args.quick ?? false;
const LOAD_MS = quick ? 15_000 : 60_000;
const REQUESTS_PER_SECOND = Number(args.rate ?? 150);
/** After the load, how long the ledger may take to level before the scenario gives up. */
const DRAIN_CAP_MS = quick ? 30_000 : 120_000;
/** How long the start-up active_sensors run may take before the load starts anyway. */
const STARTUP_CAP_MS = quick ? 20_000 : 240_000;

const ALL_SCENARIOS: Scenario[] = [
  {
    name: '10k customers, v1, live limit 1,000/s',
    customers: 10_000,
    transport: 'v1',
    limit: 1000,
    live: true,
  },
  {
    name: '10k customers, v2, sandbox limit 25/s',
    customers: 10_000,
    transport: 'v2',
    limit: 25,
    live: false,
  },
  {
    name: '10k customers x 600 requests/s, v2, live limit 1,000 requests/s',
    customers: 10_000,
    transport: 'v2',
    limit: 1000,
    live: true,
    rate: 600,
  },
  {
    name: '100k customers, v2, live limit 1,000 requests/s',
    customers: 100_000,
    transport: 'v2',
    limit: 1000,
    live: true,
  },
  {
    name: '1k customers, v1, live limit 1,000/s',
    customers: 1_000,
    transport: 'v1',
    limit: 1000,
    live: true,
  },
];
const METRONOME_SCENARIOS: Scenario[] = [
  {
    name: '10k customers, Metronome, 0-500 ms ingest',
    customers: 10_000,
    // The Stripe fields are unused here: no organization bills to Stripe.
    transport: 'v1',
    limit: 1000,
    live: true,
    destination: 'metronome',
  },
];
const SCENARIOS = (args.destination === 'metronome' ? METRONOME_SCENARIOS : ALL_SCENARIOS).filter(
  (s) => !args.only || s.name.includes(args.only),
);

/** What a scenario reads from its destination's emulator: the same view of Stripe's and Metronome's. */
interface DestinationView {
  url: string;
  events(eventName: string): { identifier: string; customer: string; value: number; receivedAt: number }[];
  counters(): { calls: number; rateLimited: number };
  stop(): Promise<void>;
}

function stripeView(e: StripeEmulator): DestinationView {
  return {
    url: e.url,
    events: (eventName) => e.events({ event_name: eventName }),
    counters: () => ({ calls: e.counters().calls, rateLimited: e.counters().rateLimited }),
    stop: () => e.stop(),
  };
}

function metronomeView(e: MetronomeEmulator): DestinationView {
  return {
    url: e.url,
    events: (eventName) =>
      e.events({ event_type: eventName }).map((x) => ({
        identifier: x.transaction_id,
        customer: x.customer_id,
        value: Number(x.properties.value),
        receivedAt: x.receivedAt,
      })),
    counters: () => ({ calls: e.counters().calls.ingest, rateLimited: e.counters().rateLimited }),
    stop: () => e.stop(),
  };
}

const log = (msg: string) => console.error(`[bench:scale ${new Date().toISOString().slice(11, 19)}] ${msg}`);
// Which organization each request comes from: seeded, so a run can be replayed (MB_TEST_SEED).
const random = seededRandom();
log(`random seed ${random.seed}`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;

interface Sample {
  t: number;
  pendingRows: number;
  oldestPendingAgeMs: number;
  callsPerSecond: number;
  rateLimitedPerSecond: number;
  /** meter-delivery jobs: due and waiting for a fetcher, deferred (start_after ahead), active. */
  jobsReady: number;
  jobsDeferred: number;
  jobsActive: number;
}

async function createManyOrgs(db: Parameters<typeof createOrgs>[0], n: number): Promise<Org[]> {
  const chunks = 8;
  const per = Math.ceil(n / chunks);
  const parts = await Promise.all(
    Array.from({ length: chunks }, (_, i) => createOrgs(db, Math.min(per, n - i * per), 1, `sc${i}`)),
  );
  return parts.flat();
}

async function jobStates(pool: pg.Pool): Promise<{ ready: number; deferred: number; active: number }> {
  const r = await pool.query<{ ready: string; deferred: string; active: string }>(
    `SELECT count(*) FILTER (WHERE state IN ('created', 'retry') AND start_after <= now()) AS ready,
            count(*) FILTER (WHERE state IN ('created', 'retry') AND start_after > now()) AS deferred,
            count(*) FILTER (WHERE state = 'active') AS active
       FROM pgboss.job WHERE name = 'meter-delivery'`,
  );
  const row = r.rows[0];
  return {
    ready: Number(row?.ready ?? 0),
    deferred: Number(row?.deferred ?? 0),
    active: Number(row?.active ?? 0),
  };
}

/** The statements that cost Postgres the most since the last reset (every database of the cluster). */
async function topStatements(pool: pg.Pool) {
  const r = await pool.query<{ query: string; calls: string; total: number; mean: number }>(
    `SELECT regexp_replace(query, '\\s+', ' ', 'g') AS query, calls::text, total_exec_time AS total,
            mean_exec_time AS mean
       FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25`,
  );
  return r.rows.map((x) => ({
    query: x.query.slice(0, 140),
    calls: Number(x.calls),
    totalMs: round(x.total),
    meanMs: round(x.mean, 3),
  }));
}

const WORKER_ROLE = 'meterbox_bench_worker';

/** The worker connects as its own role, so pg_stat_statements tells its statements from the API's. */
const workerRole = (pool: pg.Pool, url: string) => benchRole(pool, url, WORKER_ROLE);

/** The worker role's statements since the last reset, per delivered event. */
async function workerStatements(pool: pg.Pool, events: number) {
  const r = await pool.query<{ calls: string | null; ms: number | null }>(
    `SELECT sum(s.calls)::text AS calls, sum(s.total_exec_time)::float8 AS ms
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1`,
    [WORKER_ROLE],
  );
  const calls = Number(r.rows[0]?.calls ?? 0);
  const ms = Number(r.rows[0]?.ms ?? 0);
  // Where the worker's statements go: the ten it ran most often.
  const top = await pool.query<{ query: string; calls: string; ms: number }>(
    `SELECT regexp_replace(s.query, '\\s+', ' ', 'g') AS query, s.calls::text, s.total_exec_time AS ms
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1
      ORDER BY s.calls DESC LIMIT 10`,
    [WORKER_ROLE],
  );
  return {
    events,
    statements: calls,
    statementsPerEvent: events ? round(calls / events, 3) : null,
    execMs: round(ms),
    execMsPerEvent: events ? round(ms / events, 4) : null,
    mostCalled: top.rows.map((x) => ({
      calls: Number(x.calls),
      ms: round(x.ms),
      query: x.query.slice(0, 100),
    })),
  };
}

/**
 * Events/s of ONE worker: 10,000 billable customers, one pending reading row each (and the worker's
 * own start-up active_sensors run, 10,000 more events), the emulator answering after 0 ms or 0-500 ms
 * with no account limit and the worker's budget raised out of the way: how fast the pipeline moves.
 */
async function runThroughput(
  cluster: Awaited<ReturnType<typeof startCluster>>,
  entries: Record<string, string>,
  transport: 'v1' | 'v2',
  jitterMs: number,
) {
  const customers = quick ? 2_000 : 10_000;
  log(`--- throughput: ${transport}, Stripe latency 0-${jitterMs} ms, ${customers} customers`);
  const url = await freshDatabase(cluster, 'tput');
  const harness = openDatabase(url, 8);
  await harness.pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
  const workerUrl = await workerRole(harness.pool, url);
  const cleanup: (() => Promise<unknown> | unknown)[] = [() => harness.db.destroy()];
  try {
    const orgs = await createManyOrgs(harness.db, customers);
    // One pending reading row per customer, and its delivery job, queued before the worker starts.
    await harness.pool.query(
      `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
       SELECT organization_id, 'temperature_readings', stripe_customer_id, 1, now() - interval '1 minute', now() - interval '1 hour'
         FROM subscriptions WHERE stripe_customer_id IS NOT NULL`,
    );
    const boss = new PgBoss({
      connectionString: url,
      max: 2,
      supervise: false,
      schedule: false,
      migrate: false,
    });
    await boss.start();
    for (let i = 0; i < orgs.length; i += 1000) {
      await queueDeliveries(
        boss,
        orgs.slice(i, i + 1000).map((o) => ({
          organizationId: o.organizationId,
          customerId: o.customerId,
          eventName: 'temperature_readings' as const,
        })),
      );
    }
    await boss.stop({ graceful: false, close: true });
    const emulator = await startStripeEmulator({
      port: 0,
      faults: { latencyMs: 0, jitterMs },
      ratePerSecond: 1_000_000,
      streamRatePerSecond: 1_000_000,
    });
    cleanup.push(() => emulator.stop());
    await harness.pool.query('SELECT pg_stat_statements_reset()');
    const started = Date.now();
    const worker = await startWorkerProcess(
      {
        DATABASE_URL: workerUrl,
        LOG_LEVEL: 'warn',
        STRIPE_SECRET_KEY: 'sk_live_bench_throughput',
        STRIPE_API_BASE: emulator.url,
        DELIVERY_TRANSPORT: transport,
        STRIPE_MAX_CALLS_PER_SECOND: '100000',
      },
      'worker',
      entries['src/bin/worker.ts'],
    );
    cleanup.push(() => worker.stop());
    const total = customers * 2;
    const level = await pollUntil(
      async () => emulator.events().length >= total,
      quick ? 60_000 : 240_000,
      50,
    );
    const received = emulator.events().map((e) => e.receivedAt);
    const events = received.length;
    // First to last event Stripe received: the pipeline's pace, without the process start.
    const ms = Math.max(1, Math.max(...received) - Math.min(...received));
    const startMs = Math.min(...received) - started;
    const cost = await workerStatements(harness.pool, events);
    const result = {
      transport,
      stripeLatencyMs: `0-${jitterMs}`,
      events,
      seconds: round(ms / 1000, 1),
      firstEventAfterStartMs: startMs,
      eventsPerSecond: round(events / (ms / 1000)),
      level,
      calls: emulator.counters().calls,
      worker: cost,
    };
    log(
      `${events} events in ${result.seconds} s (start-up included): ${result.eventsPerSecond} events/s, ${result.calls} calls; ${cost.statementsPerEvent} statements/event`,
    );
    return result;
  } finally {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

async function runScenario(
  s: Scenario,
  cluster: Awaited<ReturnType<typeof startCluster>>,
  entries: Record<string, string>,
) {
  log(`--- ${s.name}`);
  const url = await freshDatabase(cluster, 'scale');
  const harness = openDatabase(url, 8);
  await harness.pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
  const workerUrl = await workerRole(harness.pool, url);
  const cleanup: (() => Promise<unknown> | unknown)[] = [() => harness.db.destroy()];
  let emulator: DestinationView | undefined;
  const metronome = s.destination === 'metronome';
  /** The customer each organization's usage is billed under at the scenario's destination. */
  const billedAs = (org: Org) => (metronome ? metronomeAlias(org.organizationId) : org.customerId);
  try {
    const t0 = Date.now();
    const orgs = await createManyOrgs(harness.db, s.customers);
    log(`${orgs.length} billable customers created in ${round((Date.now() - t0) / 1000, 1)} s`);
    let env: Record<string, string>;
    if (metronome) {
      const m = await startMetronomeEmulator({ port: 0, faults: { latencyMs: 0, jitterMs: 500 } });
      // Every organization bills to Metronome, under its alias, which a customer has there.
      await harness.pool.query(
        `INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
         SELECT id, 'metronome', 'billing', '-infinity' FROM organizations`,
      );
      for (const org of orgs) m.createCustomer({ name: org.organizationId, ingest_aliases: [billedAs(org)] });
      emulator = metronomeView(m);
      env = {
        DATABASE_URL: url,
        LOG_LEVEL: 'warn',
        METRONOME_BEARER_TOKEN: 'bench-metronome',
        METRONOME_API_BASE: m.url,
      };
    } else {
      const st = await startStripeEmulator({
        port: 0,
        faults: { latencyMs: 0, jitterMs: 500 },
        ratePerSecond: s.limit,
        streamRatePerSecond: s.limit,
      });
      emulator = stripeView(st);
      env = {
        DATABASE_URL: url,
        LOG_LEVEL: 'warn',
        STRIPE_SECRET_KEY: s.live ? 'sk_live_bench_scale' : 'sk_test_bench_scale',
        STRIPE_API_BASE: st.url,
        DELIVERY_TRANSPORT: s.transport,
      };
    }
    cleanup.push(() => emulator?.stop());
    const api = await startApi(env, entries['src/bin/server.ts']);
    cleanup.push(() => api.proc.stop());
    const http = new HttpClient(api.url, 128);
    cleanup.push(() => http.close());

    // The worker's first act: the hourly active_sensors run for every billable customer.
    const workerStarted = Date.now();
    const workerEnv = args['worker-cpu-prof']
      ? { ...env, NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${join(ROOT, 'bench-results', 'cpu-prof')}` }
      : env;
    const worker = await startWorkerProcess(
      { ...workerEnv, DATABASE_URL: workerUrl },
      'worker',
      entries['src/bin/worker.ts'],
    );
    cleanup.push(() => worker.stop());
    let startupMs: number | null = null;
    let startupRows = 0;
    const startedUp = await pollUntil(
      async () => {
        const r = await harness.pool.query<{ total: string; open: string }>(
          `SELECT count(*) AS total, count(*) FILTER (WHERE status = 'pending' AND accepted_at IS NULL) AS open
             FROM meter_outbox WHERE event_name = 'active_sensors'`,
        );
        startupRows = Number(r.rows[0]?.total ?? 0);
        return startupRows >= s.customers && Number(r.rows[0]?.open ?? 1) === 0;
      },
      STARTUP_CAP_MS,
      250,
    );
    if (startedUp) startupMs = Date.now() - workerStarted;
    // The run itself: from its commit (the rows' created_at) to the last of its events at Stripe.
    const runCommit = await harness.pool.query<{ t: string | null }>(
      `SELECT (extract(epoch FROM min(created_at)) * 1000)::float8::text AS t FROM meter_outbox WHERE event_name = 'active_sensors'`,
    );
    const lastActive = Math.max(0, ...emulator.events('active_sensors').map((e) => e.receivedAt));
    const startupRunMs =
      startedUp && runCommit.rows[0]?.t ? Math.round(lastActive - Number(runCommit.rows[0].t)) : null;
    const startupCounters = emulator.counters();
    const startupPending = await pendingOutbox(harness.pool);
    log(
      startupMs === null
        ? `active_sensors start-up run not delivered within ${STARTUP_CAP_MS / 1000} s (${startupPending.rows} rows pending)`
        : `active_sensors start-up run: ${startupRows} events delivered ${round(startupMs / 1000, 1)} s after the worker was spawned, ${round((startupRunMs ?? 0) / 1000, 1)} s after the run committed; ${startupCounters.rateLimited} 429s`,
    );

    // ---- the load: single-reading requests, open loop, spread over every customer
    const source = new ReadingSource();
    const samples: Sample[] = [];
    let last = emulator.counters();
    const sampler = setInterval(() => {
      const now = emulator!.counters();
      const t = Date.now();
      const prev = last;
      last = now;
      void Promise.all([pendingOutbox(harness.pool), jobStates(harness.pool)]).then(([p, j]) => {
        samples.push({
          t,
          pendingRows: p.rows,
          oldestPendingAgeMs: p.oldestMs,
          callsPerSecond: now.calls - prev.calls,
          rateLimitedPerSecond: now.rateLimited - prev.rateLimited,
          jobsReady: j.ready,
          jobsDeferred: j.deferred,
          jobsActive: j.active,
        });
        if (args.verbose) {
          log(
            `  t=${round((t - loadStart) / 1000)}s pending ${p.rows} calls/s ${now.calls - prev.calls} jobs ready ${j.ready} deferred ${j.deferred} active ${j.active}`,
          );
        }
      });
    }, 1000);
    cleanup.push(() => clearInterval(sampler));
    await harness.pool.query('SELECT pg_stat_statements_reset()');
    const eventsBefore =
      emulator.events('temperature_readings').length + emulator.events('active_sensors').length;
    const before = emulator.counters();
    const loadStart = Date.now();
    const intervalMs = 1000 / (s.rate ?? REQUESTS_PER_SECOND);
    let sent = 0;
    let ok = 0;
    let failed = 0;
    const requestMs: number[] = [];
    const inflight = new Set<Promise<void>>();
    const readingsPerOrg = new Map<string, number>();
    while (Date.now() - loadStart < LOAD_MS) {
      const due = Math.floor((Date.now() - loadStart) / intervalMs);
      while (sent < due) {
        const org = orgs[random.int(orgs.length)]!;
        sent++;
        const p = http
          .postJson('/v1/readings', JSON.stringify({ readings: source.batch(org, 1) }), org.apiKey)
          .then((res) => {
            requestMs.push(res.ms);
            if (res.status === 201) {
              ok++;
              readingsPerOrg.set(billedAs(org), (readingsPerOrg.get(billedAs(org)) ?? 0) + 1);
            } else failed++;
          });
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
      }
      await sleep(Math.max(1, intervalMs / 2));
    }
    await Promise.all(inflight);
    const loadEnd = Date.now();
    const loadCounters = emulator.counters();
    log(
      `load: ${ok} readings accepted by the API in ${round((loadEnd - loadStart) / 1000, 1)} s (${failed} failed)`,
    );

    // ---- drain
    let drainMs: number | null = null;
    if (await pollUntil(async () => (await pendingOutbox(harness.pool)).rows === 0, DRAIN_CAP_MS, 100))
      drainMs = Date.now() - loadEnd;
    clearInterval(sampler);
    const after = emulator.counters();
    const statements = args.profile ? await topStatements(harness.pool) : [];
    const workerCost = await workerStatements(
      harness.pool,
      emulator.events('temperature_readings').length +
        emulator.events('active_sensors').length -
        eventsBefore,
    );
    log(
      `worker: ${workerCost.statementsPerEvent} statements and ${workerCost.execMsPerEvent} ms of Postgres execution per delivered event (${workerCost.events} events)`,
    );
    for (const st of statements.slice(0, 12)) {
      log(`  ${String(st.totalMs).padStart(8)} ms ${String(st.calls).padStart(7)} calls  ${st.query}`);
    }
    log(
      drainMs === null
        ? `not level ${DRAIN_CAP_MS / 1000} s after the load`
        : `level ${round(drainMs / 1000, 1)} s after the load`,
    );

    // ---- commit -> acceptance, per reading row (its outbox row's creation to Stripe's receipt)
    const accepted = new Map(
      emulator.events('temperature_readings').map((e) => [e.identifier, e.receivedAt]),
    );
    const rows = await harness.pool.query<{ identifier: string | null; created: string; status: string }>(
      `SELECT identifier, (extract(epoch FROM created_at) * 1000)::float8::text AS created,
              CASE WHEN status = 'pending' AND accepted_at IS NOT NULL THEN 'validating' ELSE status END AS status
         FROM meter_outbox WHERE event_name = 'temperature_readings'`,
    );
    const lag: number[] = [];
    for (const r of rows.rows) {
      const at = r.identifier ? accepted.get(r.identifier) : undefined;
      if (at !== undefined) lag.push(at - Number(r.created));
    }

    // ---- exactly once: Stripe's per-customer sums equal the readings the API accepted
    const events = emulator.events('temperature_readings');
    const identifiers = new Set(events.map((e) => e.identifier));
    const stripeSum = new Map<string, number>();
    for (const e of events) stripeSum.set(e.customer, (stripeSum.get(e.customer) ?? 0) + e.value);
    let mismatched = 0;
    for (const [customer, n] of readingsPerOrg) if ((stripeSum.get(customer) ?? 0) !== n) mismatched++;
    for (const [customer, sum] of stripeSum) if (!readingsPerOrg.has(customer) && sum !== 0) mismatched++;
    // v2 rows Stripe accepted and is still validating count as billed here (nothing is left to send).
    const undelivered = rows.rows.filter((r) => r.status !== 'delivered' && r.status !== 'validating').length;

    const loadCalls = loadCounters.calls - before.calls;
    const totalCalls = after.calls - startupCounters.calls;
    const rateLimited = after.rateLimited - startupCounters.rateLimited;
    const maxBacklog = Math.max(0, ...samples.filter((x) => x.t <= loadEnd).map((x) => x.pendingRows));
    const lastQuarter = samples.filter((x) => x.t > loadStart + (LOAD_MS * 3) / 4 && x.t <= loadEnd);
    const firstQuarter = samples.filter((x) => x.t > loadStart && x.t <= loadStart + LOAD_MS / 4);
    const mean = (xs: number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);
    const result = {
      scenario: s,
      startup: {
        activeSensorsEvents: startupRows,
        deliveredMs: startupMs,
        runCommitToLastEventMs: startupRunMs,
        pendingAtCap: startupMs === null ? startupPending.rows : 0,
        calls: startupCounters.calls,
        rateLimited: startupCounters.rateLimited,
      },
      load: {
        seconds: round((loadEnd - loadStart) / 1000, 1),
        requestsPerSecondAsked: s.rate ?? REQUESTS_PER_SECOND,
        requestsPerSecond: round(sent / ((loadEnd - loadStart) / 1000), 1),
        readingsAccepted: ok,
        requestErrors: failed,
        requestLatencyMs: latencySummary(requestMs),
        stripeCallsPerSecond: round(loadCalls / ((loadEnd - loadStart) / 1000), 1),
      },
      backlog: {
        max: maxBacklog,
        meanFirstQuarter: round(mean(firstQuarter.map((x) => x.pendingRows))),
        meanLastQuarter: round(mean(lastQuarter.map((x) => x.pendingRows))),
        // Level: the last quarter's backlog within half again of the first quarter's (or 500 rows more).
        bounded:
          mean(lastQuarter.map((x) => x.pendingRows)) <=
          Math.max(
            1.5 * mean(firstQuarter.map((x) => x.pendingRows)),
            mean(firstQuarter.map((x) => x.pendingRows)) + 500,
          ),
      },
      commitToAcceptanceMs: latencySummary(lag),
      drainMs,
      calls: totalCalls,
      rateLimited,
      rateLimitedShare: totalCalls ? round((100 * rateLimited) / totalCalls, 2) : 0,
      ledger: {
        readingsAccepted: ok,
        stripeEvents: events.length,
        stripeSum: [...stripeSum.values()].reduce((a, b) => a + b, 0),
        identifiersUnique: identifiers.size === events.length,
        customersMismatched: mismatched,
        rowsNotDelivered: undelivered,
      },
      statements,
      worker: workerCost,
      samples: samples.map((x) => ({ ...x, t: round((x.t - loadStart) / 1000, 1) })),
    };
    log(
      `backlog max ${maxBacklog} (first quarter mean ${result.backlog.meanFirstQuarter}, last ${result.backlog.meanLastQuarter}); ` +
        `commit->acceptance p50 ${result.commitToAcceptanceMs.p50} ms p99 ${result.commitToAcceptanceMs.p99} ms; ` +
        `${result.load.stripeCallsPerSecond} calls/s; 429s ${rateLimited}/${totalCalls} (${result.rateLimitedShare}%); ` +
        `ledger: ${result.ledger.stripeSum} billed of ${ok}, ${mismatched} customers off, ${undelivered} rows undelivered`,
    );
    return result;
  } finally {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

export async function runScaleBench(): Promise<void> {
  const dataDir = join('/tmp', `meterbox-bench-scale-${process.pid}`, 'pg');
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  const buildDir = join(ROOT, 'bench-results', `.build-scale-${process.pid}`);
  log(
    `embedded Postgres in ${dataDir}; ${REQUESTS_PER_SECOND} requests/s for ${LOAD_MS / 1000} s per scenario`,
  );
  const cluster = await startCluster(dataDir);
  try {
    // pg_stat_statements counts the worker's statements per delivered event in every scenario.
    const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
    await admin.connect();
    await admin.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`);
    await admin.end();
    await cluster.restart();
    const entries = await buildEntries(['src/bin/server.ts', 'src/bin/worker.ts'], buildDir);
    const results = [];
    const throughput = [];
    if (args.throughput) {
      for (const transport of ['v1', 'v2'] as const)
        for (const jitterMs of [0, 500])
          throughput.push(await runThroughput(cluster, entries, transport, jitterMs));
    } else {
      for (const s of SCENARIOS) results.push(await runScenario(s, cluster, entries));
    }
    const out = {
      kind: 'scale',
      at: new Date().toISOString(),
      quick,
      machine: {
        cpus: cpus().length,
        cpuModel: cpus()[0]?.model,
        memoryGiB: round(totalmem() / 2 ** 30, 1),
        node: process.version,
        postgres: await cluster.version(),
        gitCommit: execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim(),
      },
      conditions: {
        requestsPerSecond: REQUESTS_PER_SECOND,
        loadSeconds: LOAD_MS / 1000,
        stripeLatencyMs: 'uniform 0-500',
        worker: 'one process, default settings, its own database role (pg_stat_statements per role)',
      },
      results,
      throughput,
    };
    // Relative to the checkout, as the default is; an absolute --out is taken as given.
    const file = resolve(ROOT, args.out ?? join('bench-results', `scale-${Date.now()}.json`));
    writeFileSync(file, `${JSON.stringify(out, null, 2)}\n`);
    log(`results written to ${file}`);
  } finally {
    await cluster.stop();
    rmSync(buildDir, { recursive: true, force: true });
    rmSync(join('/tmp', `meterbox-bench-scale-${process.pid}`), { recursive: true, force: true });
  }
}
