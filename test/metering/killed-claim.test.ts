// A worker killed in the middle of a slow claim. The claim is a transaction whose COMMIT the worker
// sends only once it has the claim's answer, so a worker that dies before that leaves a transaction that
// can never commit: Postgres rolls it back when it finds the client gone. Asked at the connection's
// start-up to check that its client is still there (client_connection_check_interval,
// DB_SERVER_TIMEOUTS), it stops the claim within a second or two; without that, the claim runs on to
// its end with its key row locked (the reaper passes over the key and the job the dead worker fetched)
// and rolls back then. Either way the dead worker's lease is never committed, and the reaper takes the
// job as orphaned and queues its key once the row is free. Simulation seed 3454 found that the model
// let such a claim (slowed 25 s) commit the dead worker's lease 19.5 s after the kill; the model now
// rolls back a dead worker's statement the server would still be running SERVER_STOPS_DEAD_CLIENT_MS
// after the death (scripts/sim/world.ts, crash).
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { serverBoundedUrl } from '../../src/db/dead-connections.js';
import type { DB } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { takeQueuedJob, waitFor, writeRows } from './delivery-helpers.js';

const it = contextTest({});

/** How long the claim's lease of the key sleeps (its row locked): a claim slowed by the database. */
const CLAIM_SLEEP_SECONDS = 6;
const OWNER = 'killed-worker:1';

async function sleepingBackends(ctx: Context): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE datname = current_database() AND wait_event = 'PgSleep'`.execute(ctx.db);
  return rows[0]?.n ?? 0;
}

/**
 * The killed claim is over: nothing sleeps, and its transaction is gone (the key row lockable again).
 * A claim whose sleep has ended still holds the row until the server finds the client gone and rolls
 * it back, and the reaper passes over a locked key row: asked in between, it freed nothing (CI, PG15).
 */
async function claimGone(ctx: Context, customerId: string): Promise<boolean> {
  if ((await sleepingBackends(ctx)) > 0) return false;
  const { rows } = await sql`
    SELECT 1 FROM meter_delivery_keys WHERE stripe_customer_id = ${customerId}
       FOR KEY SHARE SKIP LOCKED`.execute(ctx.db);
  return rows.length === 1;
}

async function leaseOwner(ctx: Context, customerId: string): Promise<string | null | undefined> {
  const { rows } = await sql<{ lease_owner: string | null }>`
    SELECT lease_owner FROM meter_delivery_keys WHERE stripe_customer_id = ${customerId}`.execute(ctx.db);
  return rows[0]?.lease_owner;
}

/**
 * A key with a pending row, its job fetched a minute ago by a worker whose claim of the key now sleeps
 * CLAIM_SLEEP_SECONDS with the key row locked; the worker is then killed (its socket closed). Returns
 * the key and when the kill happened (performance.now()).
 */
async function killMidClaim(ctx: Context, databaseUrl: string, bounded: boolean) {
  const org = await createOrganization(ctx.db);
  await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
  await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
            VALUES (${org.organizationId}, ${org.customerId}, 'temperature_readings')`.execute(ctx.db);
  const job = await takeQueuedJob(ctx, org);
  await sql`UPDATE pgboss.job SET started_on = now() - interval '1 minute' WHERE id = ${job.id}`.execute(
    ctx.db,
  );
  // The claim's lease of the key sleeps (a BEFORE UPDATE trigger): the row is locked by then.
  await sql`
    CREATE OR REPLACE FUNCTION test_killed_claim_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(${sql.lit(CLAIM_SLEEP_SECONDS)}); RETURN NEW; END $$`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_killed_claim_sleep BEFORE UPDATE ON meter_delivery_keys
       FOR EACH ROW WHEN (NEW.lease_owner = ${sql.lit(OWNER)})
       EXECUTE FUNCTION test_killed_claim_sleep()`.execute(ctx.db);
  // The worker's own connection, as the context opens them (the server's bounds, or none).
  const pool = new pg.Pool({
    connectionString: bounded
      ? serverBoundedUrl(databaseUrl, { DB_SERVER_TIMEOUTS: 'on', DB_STATEMENT_DEADLINE_MS: 10_000 })
      : databaseUrl,
    max: 1,
  });
  pool.on('error', () => undefined);
  let client: pg.PoolClient | undefined;
  pool.on('connect', (c) => {
    c.on('error', () => undefined);
    client = c;
  });
  const workerDb = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  const key: KeyRef = { ...org, eventName: 'temperature_readings' };
  const claim = claimBatch(workerDb, [key], {
    owner: OWNER,
    leaseSeconds: 5,
    now: new Date(),
    maxRows: 10,
    sendable: ['temperature_readings'],
  }).catch(() => 'never answered');
  await waitFor(
    'the claim to sleep with the key row locked',
    async () => (await sleepingBackends(ctx)) === 1,
    10_000,
  );
  // Killed: the process's kernel closes its sockets.
  (client as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  const killedAt = performance.now();
  return {
    org,
    killedAt,
    async cleanUp() {
      await claim;
      await pool.end().catch(() => undefined);
      await sql`DROP TRIGGER test_killed_claim_sleep ON meter_delivery_keys`.execute(ctx.db);
    },
  };
}

describe('a worker killed in the middle of its claim', () => {
  it('the server rolls the claim back: the key is never leased to the dead worker, and the reaper queues it within seconds', {
    timeout: 30_000,
  }, async ({ ctx, databaseUrl }) => {
    const killed = await killMidClaim(ctx, databaseUrl, true);
    try {
      await waitFor('the server to stop the claim', () => claimGone(ctx, killed.org.customerId), 5_000);
      expect(performance.now() - killed.killedAt).toBeLessThan(CLAIM_SLEEP_SECONDS * 1000 - 2_000);
      // Rolled back: the key row is free, its lock gone, and it stays so past the claim's end.
      expect(await leaseOwner(ctx, killed.org.customerId)).toBeNull();
      // The job the dead worker fetched is orphaned now (its key neither leased nor locked): queued again.
      const freed = await reapOnce({ ...ctx, distributed: () => false });
      expect(freed.jobs).toBe(1);
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'
           AND singleton_key = ${`temperature_readings:${killed.org.customerId}`}`.execute(ctx.db);
      expect(rows[0]?.n).toBe(1);
      await new Promise((r) => setTimeout(r, CLAIM_SLEEP_SECONDS * 1000));
      expect(await leaseOwner(ctx, killed.org.customerId)).toBeNull();
    } finally {
      await killed.cleanUp();
    }
  });

  it('without the server’s bounds the claim runs on to its end, its key row locked, then rolls back (what the bounds shorten)', {
    timeout: 30_000,
  }, async ({ ctx, databaseUrl }) => {
    const killed = await killMidClaim(ctx, databaseUrl, false);
    try {
      await new Promise((r) => setTimeout(r, 2_500));
      // Still running for the dead worker: its lock keeps the reaper off the key and the fetched job.
      expect(await sleepingBackends(ctx)).toBe(1);
      expect((await reapOnce({ ...ctx, distributed: () => false })).jobs).toBe(0);
      await waitFor(
        'the claim to end and roll back',
        () => claimGone(ctx, killed.org.customerId),
        (CLAIM_SLEEP_SECONDS + 5) * 1000,
      );
      expect(performance.now() - killed.killedAt).toBeGreaterThan(CLAIM_SLEEP_SECONDS * 1000 - 2_000);
      // Its transaction's COMMIT was never sent (the client died before the claim's answer): rolled back.
      expect(await leaseOwner(ctx, killed.org.customerId)).toBeNull();
      expect((await reapOnce({ ...ctx, distributed: () => false })).jobs).toBe(1);
    } finally {
      await killed.cleanUp();
    }
  });
});
