// meterbox on a Citus cluster (coordinator + 2 workers, test/support/citus-setup.ts): the API, the
// worker and the admin surface on the distributed database, ending with the ledger check under
// Stripe faults: per organization, billed = stored − voided, exactly.
//
// Why this file is long: one Citus cluster (a minute to start) shared by every check of the distributed database.
import { buildEvent, subscription } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect, inject } from 'vitest';
import { recordApiKeysUsed } from '../../src/credentials/api-keys.js';
import { sqlState } from '../../src/db/errors.js';
import { createLogger } from '../../src/log.js';
import { reportActiveSensorsForHour } from '../../src/metering/active-sensors.js';
import {
  createWeekPartition,
  partitionName,
  runStorageMaintenance,
  weekStart,
} from '../../src/storage/maintenance.js';
import { deliver, WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
  signIn,
} from '../support/fixtures.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');
const workerUrls = inject('citusWorkerUrls');
const ADMIN_TOKEN = 'admin-token-citus-0123456789abcdef';

// What the in-process API and workers warn about (a 503's reason is logged, not answered): the
// failure messages below end with it.
const warnings: string[] = [];
const warningLog = createLogger('warn', {}, { write: (line: string) => void warnings.push(line) });
const lastWarnings = () => `\nlogged warnings (last 10):\n${warnings.slice(-10).join('')}`;

/** Runs `step` again (at most five times) when Citus cancels it in a distributed deadlock (40P01). */
async function againOnDeadlock<T>(step: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await step();
    } catch (err) {
      if (sqlState(err) !== '40P01' || attempt === 5) throw err;
      console.warn(`[citus] set-up cancelled in a distributed deadlock (attempt ${attempt}): set up again`);
      await new Promise((r) => setTimeout(r, 100 * attempt));
    }
  }
}

const it = stripeTest({
  emulator: { strictCustomers: true },
  overrides: { log: warningLog },
  env: {
    DATABASE_URL: url,
    ADMIN_TOKEN,
    STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    STRIPE_SECRET_KEY: 'sk_test_citus',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_RETRY_LIMIT: '50',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '5',
    SWEEP_STALE_SECONDS: '10',
  },
  processes: 2,
  supervise: true,
})
  // Each test's organization is set up again when Citus cancels its insert in a distributed deadlock,
  // as the last test's set-up is: a rehearsal once saw the organization's insert (its API key, a
  // reference table) cancelled so before "serves reconciliation and the dashboard" (2026-11-30; not
  // reproduced in reruns, its other side not identified). Set-up, not the behaviour under test.
  .extend('org', async ({ ctx, emulator }) => {
    const org = await againOnDeadlock(() => createOrganization(ctx.db));
    emulator.createCustomer({ id: org.customerId });
    return org;
  });

interface Requester {
  request(path: string, init?: RequestInit): Response | Promise<Response>;
}

async function send(app: Requester, method: string, path: string, token: string, body?: unknown) {
  const res = await app.request(path, {
    method,
    headers: authHeaders(token),
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

const post = (app: Requester, path: string, token: string, body: unknown) =>
  send(app, 'POST', path, token, body);

const HOUR = 3600_000;
const around = () => ({
  from: new Date(Date.now() - 2 * HOUR).toISOString(),
  to: new Date(Date.now() + HOUR).toISOString(),
});

/** Rows of each worker's shards of `table` (the placements of the coordinator's shell table). */
async function shardsOnWorkers(table: string): Promise<string[][]> {
  return Promise.all(
    workerUrls.map(async (workerUrl) => {
      const client = new pg.Client({ connectionString: workerUrl });
      await client.connect();
      try {
        // Citus hides shards from pg_class for application sessions.
        await client.query('SET citus.override_table_visibility = off');
        const { rows } = await client.query<{ relname: string }>(
          `SELECT relname FROM pg_class WHERE relname ~ $1 AND relkind IN ('r', 'p') ORDER BY relname`,
          [`^${table}_[0-9]+$`],
        );
        return rows.map((r) => r.relname);
      } finally {
        await client.end();
      }
    }),
  );
}

describe.skipIf(!url)('meterbox on a Citus cluster', () => {
  it('ingests, de-duplicates and rejects readings of another organization; usage counts them', async ({
    app,
    ctx,
    org,
  }) => {
    const other = await createSensors(ctx.db, (await createOrganization(ctx.db)).organizationId);
    const sensors = await createSensors(ctx.db, org.organizationId, 3);
    const batch = sensors.flatMap((s) => [reading(s, 60), reading(s, 120)]);
    expect(await post(app, '/v1/readings', org.apiKey, { readings: batch })).toMatchObject({
      status: 201,
      body: { inserted: 6, duplicates: 0 },
    });
    expect(await post(app, '/v1/readings', org.apiKey, { readings: batch })).toMatchObject({
      status: 201,
      body: { inserted: 0, duplicates: 6 },
    });
    const refused = await post(app, '/v1/readings', org.apiKey, { readings: [reading(other[0]!, 30)] });
    expect(refused.status).toBe(422);
    const from = new Date(Date.now() - 3600_000).toISOString();
    const to = new Date(Date.now() + 3600_000).toISOString();
    const usage = await app.request(`/v1/usage?from=${from}&to=${to}`, { headers: authHeaders(org.apiKey) });
    expect(usage.status).toBe(200);
    expect(JSON.stringify(await usage.json())).toContain('"readingsStored":6');
  });

  it('records when keys were last used (api_keys is a reference table: no STABLE function over a column)', async ({
    ctx,
    org,
  }) => {
    const keys = await ctx.db
      .selectFrom('api_keys')
      .select(['id', 'last_used_at'])
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(keys.length).toBeGreaterThan(0);
    const at = new Date(Date.now() + 3600_000);
    await recordApiKeysUsed(
      ctx.db,
      keys.map((k) => ({ keyId: k.id, at })),
    );
    const after = await ctx.db
      .selectFrom('api_keys')
      .select('last_used_at')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(after.map((k) => k.last_used_at?.getTime())).toEqual(keys.map(() => at.getTime()));
    // Within the resolution of the stored value: not written again.
    await recordApiKeysUsed(
      ctx.db,
      keys.map((k) => ({ keyId: k.id, at: new Date(at.getTime() + 1_000) })),
    );
    const again = await ctx.db
      .selectFrom('api_keys')
      .select('last_used_at')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(again.map((k) => k.last_used_at?.getTime())).toEqual(keys.map(() => at.getTime()));
  });

  it('registers, lists and deactivates sensors; a deactivation reports active_sensors', async ({
    app,
    ctx,
    org,
  }) => {
    const created = await post(app, '/v1/sensors', org.apiKey, { name: 'freezer 1' });
    expect(created.status).toBe(201);
    const id = String(created.body.id);
    const listed = await send(app, 'GET', '/v1/sensors', org.apiKey);
    expect(JSON.stringify(listed.body)).toContain(id);
    const patched = await send(app, 'PATCH', `/v1/sensors/${id}`, org.apiKey, { active: false });
    expect(patched).toMatchObject({ status: 200, body: { id, active: false } });
    const reports = await ctx.db
      .selectFrom('meter_outbox')
      .select(['value'])
      .where('organization_id', '=', org.organizationId)
      .where('event_name', '=', 'active_sensors')
      .orderBy('id')
      .execute();
    // Registering reported one active sensor, deactivating it none.
    expect(reports.map((r) => Number(r.value))).toEqual([1, 0]);
  });

  it('applies a webhook once: the subscription changes, a redelivery changes nothing', async ({
    app,
    ctx,
    org,
  }) => {
    const event = buildEvent(
      'customer.subscription.updated',
      subscription({ id: `sub_citus${Date.now()}`, customer: org.customerId, status: 'past_due' }),
    );
    expect((await deliver(app, event)).status).toBe(200);
    expect((await deliver(app, event)).status).toBe(200);
    const row = await ctx.db
      .selectFrom('subscriptions')
      .select(['status'])
      .where('organization_id', '=', org.organizationId)
      .executeTakeFirstOrThrow();
    expect(row.status).toBe('past_due');
    const events = await ctx.db
      .selectFrom('stripe_events')
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .where('event_id', '=', event.id)
      .executeTakeFirstOrThrow();
    expect(Number(events.n)).toBe(1);
  });

  it('reports active sensors for an hour once per organization', async ({ ctx, org }) => {
    await createSensors(ctx.db, org.organizationId, 4);
    const hour = new Date(Date.UTC(2026, 0, 5, 10, 30));
    for (let i = 0; i < 2; i++)
      await ctx.db
        .transaction()
        .execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour, { distributed: true }));
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['value', 'dedupe_key'])
      .where('organization_id', '=', org.organizationId)
      .where('event_name', '=', 'active_sensors')
      .execute();
    expect(rows.map((r) => [Number(r.value), r.dedupe_key])).toEqual([
      [4, `active_sensors:${org.organizationId}:2026-01-05T10`],
    ]);
  });

  it('maintains storage on every shard: partitions ahead, retention, compaction', async ({ ctx, org }) => {
    const now = new Date();
    const config = { READINGS_RETENTION_DAYS: 400, OUTBOX_COMPACTION_DAYS: 7 };
    // An expired week, as an older deployment left it: a partition with one reading, and a
    // delivered outbox row older than the compaction age.
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const oldWeek = weekStart(new Date(now.getTime() - 420 * 86_400_000));
    await createWeekPartition(ctx.db, oldWeek);
    await sql`
      INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
      VALUES (${sensor}, ${new Date(oldWeek.getTime() + 3_600_000)}, ${org.organizationId}, 3.5,
              ${new Date(oldWeek.getTime() + 3_600_000)})`.execute(ctx.db);
    const old = new Date(now.getTime() - 10 * 86_400_000);
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at,
                                status, identifier, delivered_at)
      VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, 7, ${old},
              'delivered', ${`citus-old-${org.organizationId}`}, ${old})`.execute(ctx.db);

    await runStorageMaintenance({
      db: ctx.db,
      log: ctx.log,
      clock: { now: () => now },
      config,
      distributed: ctx.distributed,
    });

    const partitions = await sql<{ name: string }>`
      SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
       WHERE i.inhparent = 'temperature_readings'::regclass AND c.relname ~ '^temperature_readings_p'
       ORDER BY 1`.execute(ctx.db);
    const names = partitions.rows.map((r) => r.name);
    expect(names.length).toBeGreaterThanOrEqual(5);
    expect(names).not.toContain(partitionName(oldWeek));
    // Every shard of the newest weekly partition exists on a worker: four shards over two nodes.
    const shards = await shardsOnWorkers(names.at(-1)!);
    expect(shards.flat()).toHaveLength(4);
    expect(shards.every((onNode) => onNode.length > 0)).toBe(true);
    // The dropped partition's reading is counted in the rollup; the old row is compacted.
    const rollup = await ctx.db
      .selectFrom('readings_hourly_rollup')
      .select(['readings'])
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(rollup.map((r) => Number(r.readings))).toEqual([1]);
    const compacted = await ctx.db
      .selectFrom('meter_usage_hourly')
      .select(['value', 'events'])
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(compacted.map((r) => [Number(r.value), Number(r.events)])).toEqual([[7, 1]]);
    expect(
      (
        await ctx.db
          .selectFrom('meter_outbox')
          .select('id')
          .where('organization_id', '=', org.organizationId)
          .execute()
      ).length,
    ).toBe(0);
  });

  it('corrects usage: voids the readings and writes a correction row, on the organization\u2019s shard', async ({
    app,
    ctx,
    org,
  }) => {
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const stored = await post(app, '/v1/readings', org.apiKey, {
      readings: [reading(sensor!, 300), reading(sensor!, 240), reading(sensor!, 180)],
    });
    expect(stored.status).toBe(201);
    const res = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
      method: 'POST',
      headers: authHeaders(ADMIN_TOKEN),
      body: JSON.stringify({ sensorId: sensor, ...around(), reason: 'faulty probe' }),
    });
    expect(res.status).toBe(201);
    expect(((await res.json()) as { correction: { readingsVoided: number } }).correction.readingsVoided).toBe(
      3,
    );
    const voided = await sql<{ n: string }>`
      SELECT count(*) AS n FROM temperature_readings
       WHERE organization_id = ${org.organizationId} AND voided_at IS NOT NULL`.execute(ctx.db);
    expect(Number(voided.rows[0]?.n)).toBe(3);
    const corrections = await ctx.db
      .selectFrom('meter_outbox')
      .select(['kind', 'value'])
      .where('organization_id', '=', org.organizationId)
      .where('kind', '=', 'correction')
      .execute();
    const pendingUsage = await ctx.db
      .selectFrom('meter_outbox')
      .select(['value'])
      .where('organization_id', '=', org.organizationId)
      .where('kind', '=', 'usage')
      .execute();
    // Not sent yet: the usage row's value went down in place, or a correction row takes it back.
    const billed = pendingUsage.reduce((n, r) => n + Number(r.value), 0);
    const taken = corrections.reduce((n, r) => n + Number(r.value), 0);
    expect(billed - taken).toBe(0);
  });

  it('serves reconciliation and the dashboard from the cluster', async ({ app, org, ctx }) => {
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await post(app, '/v1/readings', org.apiKey, { readings: [reading(sensor!, 30)] });
    const { from, to } = around();
    const res = await app.request(
      `/admin/reconciliation?from=${from}&to=${to}&organizationId=${org.organizationId}`,
      { headers: authHeaders(ADMIN_TOKEN) },
    );
    expect(res.status).toBe(200);
    const report = (await res.json()) as {
      organizations: { organizationId: string; readingsStored: number }[];
    };
    expect(report.organizations).toEqual([
      expect.objectContaining({ organizationId: org.organizationId, readingsStored: 1 }),
    ]);
    const cookie = await signIn(app, ADMIN_TOKEN);
    const page = await app.request('/admin', { headers: { cookie } });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('meterbox');
  });

  it('bills exactly what was stored minus what was voided, per organization, through Stripe faults', async ({
    app,
    ctx,
    emulator,
    workers,
  }) => {
    expect(workers).toHaveLength(2);
    emulator.setFaults(
      { errorRate: 0.1, acceptedThen500Rate: 0.1, resetRate: 0.05, latencyMs: 20, jitterMs: 30 },
      7,
    );
    const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
    for (let i = 0; i < 6; i++) {
      // Set up while the two workers start: their start-up passes can meet this insert in a distributed
      // deadlock, which Citus resolves by cancelling one side (40P01); set up again, as a client would.
      const org = await againOnDeadlock(() => createOrganization(ctx.db));
      emulator.createCustomer({ id: org.customerId });
      orgs.push({
        ...org,
        sensors: await againOnDeadlock(() => createSensors(ctx.db, org.organizationId, 3)),
      });
    }
    // Concurrent requests of every organization (they share group-commit transactions), in rounds,
    // resent after a 503 as a sensor does: the worker's start-up storage pass (partitions created on
    // every shard) can meet a group in a distributed deadlock, which Citus resolves by cancelling one.
    let unavailable = 0;
    const store = async (org: (typeof orgs)[number], body: unknown) => {
      for (let attempt = 0; ; attempt++) {
        const answer = await post(app, '/v1/readings', org.apiKey, body);
        if (answer.status !== 503 || attempt === 5) return answer;
        unavailable++;
        await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
      }
    };
    for (let round = 0; round < 5; round++) {
      const answers = await Promise.all(
        orgs.map((org, i) =>
          store(org, { readings: org.sensors.map((s, j) => reading(s, 600 - round * 60 - j, 2 + i)) }),
        ),
      );
      expect(
        answers.map((a) => a.status),
        lastWarnings(),
      ).toEqual(orgs.map(() => 201));
    }
    // Two organizations void a sensor's readings while delivery runs (resent after a 503 too: the
    // correction and a delivery claim over the same outbox rows can deadlock across nodes).
    for (const org of orgs.slice(0, 2)) {
      let status = 0;
      for (let attempt = 0; attempt < 6; attempt++) {
        const res = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
          method: 'POST',
          headers: authHeaders(ADMIN_TOKEN),
          body: JSON.stringify({ sensorId: org.sensors[0], ...around(), reason: 'probe out of calibration' }),
        });
        status = res.status;
        if (status !== 503) break;
        unavailable++;
        await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
      }
      expect(status, lastWarnings()).toBe(201);
    }
    await waitFor(
      'every outbox row of the organizations delivered',
      async () => {
        const open = await ctx.db
          .selectFrom('meter_outbox')
          .select(['id', 'status', 'last_error'])
          .where(
            'organization_id',
            'in',
            orgs.map((o) => o.organizationId),
          )
          .where('status', '!=', 'delivered')
          .execute();
        const failures = await sql<{ message: string }>`
          SELECT DISTINCT output->>'message' AS message FROM pgboss.job
           WHERE name = 'meter-delivery' AND output ? 'message'`.execute(ctx.db);
        const jobs = await sql<{ state: string; n: string }>`
          SELECT state, count(*)::text AS n FROM pgboss.job WHERE name = 'meter-delivery' GROUP BY 1`.execute(
          ctx.db,
        );
        const keys =
          await sql`SELECT * FROM meter_delivery_keys WHERE stripe_customer_id = ANY(${orgs.map((o) => o.customerId)}::text[])`.execute(
            ctx.db,
          );
        const rows =
          await sql`SELECT id, stripe_customer_id, event_name, identifier, status, kind FROM meter_outbox WHERE status = 'pending' AND organization_id = ANY(${orgs.map((o) => o.organizationId)}::uuid[])`.execute(
            ctx.db,
          );
        expect(
          open,
          JSON.stringify({ failures: failures.rows, jobs: jobs.rows, keys: keys.rows, rows: rows.rows }),
        ).toEqual([]);
        return true;
      },
      90_000,
      500,
    );
    emulator.setFaults({});
    const failedBatches = warnings.filter((w) => w.includes('delivery batch failed')).length;
    console.log(
      `[citus ledger] ${unavailable} answers of 503 resent; ${failedBatches} delivery batches failed (retried)`,
    );
    expect(unavailable).toBeLessThan(20);
    const loaded = await loadLedger(ctx.db, orgs);
    // The file's earlier tests billed other organizations on the same database and emulator.
    const customers = new Set(orgs.map((o) => o.customerId));
    const events = emulator.events().filter((e) => customers.has(e.customer));
    const report = checkLedger({ ...loaded, events });
    expect(report.violations, formatReport('citus', report)).toEqual([]);
    // 6 organizations × 5 rounds × 3 sensors stored, 5 readings voided for each of two.
    expect(report.readingsStored).toBe(6 * 5 * 3 - 2 * 5);
    expect(report.readingsAccepted).toBe(report.readingsStored);
  }, 180_000);
});
