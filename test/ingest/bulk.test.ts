// A batch is written with a constant number of statements, whatever its size.
import { describe, expect, vi } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import { hashApiKey } from '../../src/credentials/api-keys.js';
import { storeRequest } from '../../src/ingest/group-commit.js';
import { recordingDb } from '../support/database.js';
import { authHeaders, createOrganization, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

// `recorded`: the context's pool behind a Kysely that records each statement it sends.
const it = contextTest().extend('recorded', { scope: 'file' }, async ({ ctx }) => recordingDb(ctx.pool));

/** Stores 500 readings of a new organization as one request written alone (storeRequest); the statements it sent. */
async function store500(
  ctx: Context,
  { db: counting, statements }: ReturnType<typeof recordingDb>,
  billable: boolean,
): Promise<string[]> {
  const org = await createOrganization(ctx.db, { billable });
  const sensors = await createSensors(ctx.db, org.organizationId, 10);
  const batch = readings(sensors, 500);
  return counting.transaction().execute(async (trx) => {
    statements.length = 0;
    const outcome = await storeRequest(
      trx,
      ctx.boss,
      { organizationId: org.organizationId, readings: batch },
      new Date(),
    );
    expect(outcome).toEqual({ stored: true, result: { inserted: 500, duplicates: 0 } });
    return [...statements];
  });
}

function readings(sensors: string[], count: number, hoursAgo = 24) {
  const start = Date.now() - hoursAgo * 3_600_000;
  return Array.from({ length: count }, (_, i) => ({
    sensorId: sensors[i % sensors.length]!,
    recordedAt: new Date(start + i * 1000).toISOString(),
    temperatureC: (i % 50) - 10,
  }));
}

describe('bulk efficiency', () => {
  // INGEST_GROUP_ONE_STATEMENT=on (the default): a group is one statement in autocommit, its new keys'
  // jobs queued by the statement itself. off: begin, the statement, pg-boss's insert of the jobs of keys
  // without one (the first request only), commit.
  it('sends the same number of statements for 1 reading and for 1,000 over POST /v1/readings', async ({
    ctx,
    recorded: { db: counting, statements },
  }) => {
    expect(ctx.config.INGEST_GROUP_ONE_STATEMENT).toBe('on');
    const settings = [
      // on: the first request's statement queues the job; the workers' wake-up follows it (delivery-wake.ts).
      { setting: 'on', expected: [2, 1] },
      { setting: 'off', expected: [4, 3] },
    ] as const;
    const orgs = [];
    for (const _ of settings) {
      const org = await createOrganization(ctx.db);
      orgs.push({ org, sensors: await createSensors(ctx.db, org.organizationId, 25) });
    }
    // The API key cache's listener is up and has read the live keys (warming), so the keys are served
    // without a lookup from the first request on.
    ctx.apiKeys.start();
    for (const { org } of orgs)
      await vi.waitFor(() => expect(ctx.apiKeys.get(hashApiKey(org.apiKey))).toBeDefined());
    for (const [i, { setting, expected }] of settings.entries()) {
      const { org, sensors } = orgs[i]!;
      const config = { ...ctx.config, INGEST_GROUP_ONE_STATEMENT: setting };
      const app = createApp({ ...ctx, config, db: counting });
      const counts: number[] = [];
      // The first request queues the customer's delivery job; the next two find it queued (the
      // steady state under load) and hold it until commit (src/metering/outbox.ts enqueueDelivery),
      // so 1 and 1,000 readings are compared in the same state.
      for (const batch of [readings(sensors, 1, 72), readings(sensors, 1, 48), readings(sensors, 1000)]) {
        statements.length = 0;
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({
            readings: batch.map((r) => ({ ...r, recordedAt: r.recordedAt.replace('Z', '+00:00') })),
          }),
        });
        expect(res.status).toBe(201);
        expect(((await res.json()) as { inserted: number }).inserted).toBe(batch.length);
        // The wake-up is sent after the answer's commit, not awaited by the request: its statement is
        // counted once it is there (a request without one sends none, and the count stays).
        if (counts.length === 0 && setting === 'on')
          await vi.waitFor(() => expect(statements.length).toBeGreaterThanOrEqual(expected[0]));
        counts.push(statements.length);
      }
      // The first request: the statement's look for the keys' queued jobs finds none, so the job is
      // inserted (by the statement itself with on, by pg-boss's insert in the transaction with off).
      expect(counts[0], `${setting}: ${statements.join('\n')}`).toBe(expected[0]);
      // Steady state: the statement's look finds the queued job and share-locks it; no job insert.
      expect(counts[1], `${setting}: ${statements.join('\n')}`).toBe(expected[1]);
      expect(counts[2], `${setting}: ${statements.join('\n')}`).toBe(counts[1]);
    }
  });

  it('checks the sensors, inserts the batch, writes the outbox row and looks for the queued job in one statement, plus the job', async ({
    ctx,
    recorded,
  }) => {
    const statements = await store500(ctx, recorded, true);
    // The write, with its look for an already queued delivery job (none for a new customer), then the job.
    expect(statements).toHaveLength(2);
    expect(statements[0]).toMatch(
      /FROM sensors[\s\S]*INSERT INTO temperature_readings[\s\S]*unnest|unnest[\s\S]*FROM sensors[\s\S]*INSERT INTO temperature_readings/,
    );
    expect(statements[0]).toMatch(/INSERT INTO meter_outbox[\s\S]*meterbox_lock_queued_jobs\(/);
    expect(statements[1]).toMatch(/pgboss/);
  });

  it('sends one statement and no job for an organization that is not billable', async ({ ctx, recorded }) => {
    expect(await store500(ctx, recorded, false)).toHaveLength(1);
  });
});
