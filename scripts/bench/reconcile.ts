// npm run bench -- --reconcile [--customers 10000] [--rate 25] [--share 0.25] [--max 20]
//                              [--run-seconds 300] [--limit-seconds 0] [--database-url postgres://…]
// The scheduled reconciliation at platform scale: one pass over `customers` Stripe customers (two
// meters each, delivered usage in the previous hour, the same usage at the emulator, so no drift),
// run as the worker runs it: bounded runs back to back from the persisted cursor, every summaries
// call through Stripe's budget row at STRIPE_MAX_CALLS_PER_SECOND = `rate`, the run's own pace at
// most `share` of it and `max` calls/s. Prints calls/s, the pass's length (measured, or projected
// from the measured rate when --limit-seconds stops it first) and the machine's load average.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startStripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import pg from 'pg';
import { reconcileRun } from '../../src/admin/scheduled-reconciliation.js';
import { loadConfig } from '../../src/config.js';
import { createContext } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { destinationReaders } from '../../src/metering/redrive-reconcile.js';
import { migrate } from '../../src/migrations.js';

const HOUR = 3_600_000;

async function freshDatabase(adminUrl: string): Promise<string> {
  const name = `bench_reconcile_${Date.now().toString(36)}`;
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  await migrate(
    url.toString(),
    loadConfig({ DATABASE_URL: url.toString(), LOG_LEVEL: 'silent' }),
    createLogger('silent'),
  );
  return url.toString();
}

async function dropDatabase(adminUrl: string, url: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(`DROP DATABASE IF EXISTS ${new URL(url).pathname.slice(1)} WITH (FORCE)`);
  } finally {
    await client.end();
  }
}

export async function runReconcileBench(): Promise<number> {
  const { values } = parseArgs({
    args: process.argv.slice(2).filter((a) => a !== '--reconcile'),
    options: {
      customers: { type: 'string', default: '10000' },
      rate: { type: 'string', default: '25' },
      share: { type: 'string', default: '0.25' },
      max: { type: 'string', default: '20' },
      'run-seconds': { type: 'string', default: '300' },
      'limit-seconds': { type: 'string', default: '0' },
      'database-url': {
        type: 'string',
        default: process.env.TEST_DATABASE_URL,
      },
    },
  });
  const customers = Number(values.customers);
  const limitSeconds = Number(values['limit-seconds']);
  const adminUrl = values['database-url'];
  if (!adminUrl) {
    console.error(
      'bench --reconcile needs --database-url (or TEST_DATABASE_URL): a Postgres it may create a database on',
    );
    return 2;
  }
  const hour = Math.floor(Date.now() / HOUR) * HOUR - HOUR;
  const meters = ['temperature_readings', 'active_sensors'] as const;
  const dir = mkdtempSync(join(tmpdir(), 'meterbox-reconcile-bench-'));
  // The emulator starts with the usage already recorded (its persistence file), as Stripe would hold it.
  const ids = Array.from({ length: customers }, (_, i) => `cus_bench${String(i).padStart(6, '0')}`);
  writeFileSync(
    join(dir, 'stripe.json'),
    JSON.stringify({
      version: 1,
      customers: [],
      events: ids.flatMap((customer, i) =>
        meters.map((event_name, m) => {
          const timestampMs = hour + ((i * 2 + m) % 3_000) * 1000;
          return {
            identifier: `mb_bench_${m}_${i}`,
            event_name,
            customer,
            value: 1 + (i % 50),
            timestamp: Math.floor(timestampMs / 1000),
            timestampMs,
            receivedAt: timestampMs + 1000,
            via: 'v1',
            payload: { stripe_customer_id: customer, value: String(1 + (i % 50)) },
          };
        }),
      ),
      counters: {},
    }),
  );
  const emulator = await startStripeEmulator({ persistPath: join(dir, 'stripe.json') });
  const url = await freshDatabase(adminUrl);
  const env = {
    DATABASE_URL: url,
    LOG_LEVEL: 'warn',
    STRIPE_SECRET_KEY: 'sk_test_bench',
    STRIPE_API_BASE: emulator.url,
    STRIPE_METER_ID_TEMPERATURE_READINGS: 'mtr_emu_temperature_readings',
    STRIPE_METER_ID_ACTIVE_SENSORS: 'mtr_emu_active_sensors',
    STRIPE_MAX_CALLS_PER_SECOND: values.rate,
    RECONCILIATION_BUDGET_SHARE: values.share,
    RECONCILIATION_MAX_CALLS_PER_SECOND: values.max,
    RECONCILIATION_RUN_SECONDS: values['run-seconds'],
    RECONCILIATION_SETTLE_SECONDS: '0',
    RECONCILIATION_INTERVAL_SECONDS: '3600',
  };
  const ctx = await createContext(loadConfig(env));
  try {
    await sql`
      INSERT INTO organizations (id, name)
      SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'bench ' || i
        FROM generate_series(0, ${customers - 1}) AS i`.execute(ctx.db);
    for (const [m, eventName] of meters.entries()) {
      await sql`
        INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at,
                                  status, identifier, identified_at, delivered_at)
        SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, ${eventName},
               'cus_bench' || lpad(i::text, 6, '0'), 1 + i % 50,
               to_timestamp((${hour}::bigint + ((i * 2 + ${m}::int) % 3000) * 1000) / 1000.0),
               'delivered', 'mb_bench_' || ${m} || '_' || i, now() - interval '30 minutes',
               now() - interval '30 minutes'
          FROM generate_series(0, ${customers - 1}) AS i`.execute(ctx.db);
    }
    await sql`ANALYZE meter_outbox`.execute(ctx.db);
    const deps = {
      db: ctx.db,
      config: ctx.config,
      log: ctx.log,
      metrics: ctx.metrics,
      readers: await destinationReaders({ ...ctx, distributed: false }),
    };
    const budgetBefore = await budgetCalls(ctx.db);
    const load = {
      before: loadavg()
        .map((l) => l.toFixed(2))
        .join(' '),
    };
    const started = Date.now();
    const stopAt = limitSeconds > 0 ? started + limitSeconds * 1000 : Number.POSITIVE_INFINITY;
    let runs = 0;
    let done = 0;
    let calls = 0;
    let drift = 0;
    let complete = false;
    while (!complete && Date.now() < stopAt) {
      const deadline = Math.min(stopAt, Date.now() + ctx.config.RECONCILIATION_RUN_SECONDS * 1000);
      const run = await reconcileRun(deps, 'stripe', { deadline });
      if (run.state === 'busy' || run.state === 'not_due') throw new Error(`unexpected ${run.state}`);
      runs += 1;
      done += run.customers;
      calls += run.calls;
      drift += run.drift.length + run.errors.length;
      complete = run.state === 'pass_complete';
      process.stderr.write(
        `run ${runs}: ${run.state}, ${run.customers} customers, ${run.calls} calls, ${((Date.now() - started) / 1000).toFixed(1)} s\n`,
      );
    }
    const seconds = (Date.now() - started) / 1000;
    const budget = (await budgetCalls(ctx.db)) - budgetBefore;
    const rate = calls / seconds;
    const result = {
      customers,
      stripeMaxCallsPerSecond: Number(values.rate),
      share: Number(values.share),
      maxPerSecond: Number(values.max),
      runs,
      customersCompared: done,
      calls,
      budgetSlotsTaken: budget,
      callsPerSecond: Number(rate.toFixed(2)),
      seconds: Number(seconds.toFixed(1)),
      passComplete: complete,
      // Projected from the measured rate when the limit stopped the pass first (2 calls a customer).
      passSeconds: complete ? Number(seconds.toFixed(1)) : Number(((customers * 2) / rate).toFixed(0)),
      driftOrErrors: drift,
      loadAverage: {
        before: load.before,
        after: loadavg()
          .map((l) => l.toFixed(2))
          .join(' '),
      },
      nproc: (await import('node:os')).cpus().length,
    };
    console.log(JSON.stringify(result, null, 2));
    return drift === 0 ? 0 : 1;
  } finally {
    await ctx.close();
    await emulator.stop();
    await dropDatabase(adminUrl, url);
    rmSync(dir, { recursive: true, force: true });
  }
}

async function budgetCalls(db: Parameters<typeof reconcileRun>[0]['db']): Promise<number> {
  const { rows } = await sql<{
    calls: string;
  }>`SELECT calls::text FROM meter_call_budget WHERE id = 1`.execute(db);
  return Number(rows[0]?.calls ?? 0);
}
