// A batch that cannot get a connection of its worker's pool within the pool's connect timeout (5 s,
// src/db/database.ts) is the process's problem, not the destination's nor the group's. On a slow
// database every connection of a worker's pool can be held by claims of tens of seconds; a batch whose
// claim or settle waited past the timeout failed with "timeout exceeded when trying to connect", and
// pg-boss counted it against the job's DELIVERY_RETRY_LIMIT (here 0: dead-lettered at once) and backed it
// off. Here the worker's pool (the production pool, one connection) is held for longer than its timeout
// while a batch claims, or while it settles after its call: the batch runs again once the pool is free,
// no job fails or is dead-lettered, and the group is billed once.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createDatabase } from '../../src/db/database.js';
import { startDelivery } from '../../src/metering/delivery.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

/** Longer than the pool's 5 s connect timeout. */
const HOLD_SECONDS = 8;
const ATTEMPTS = 1;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_pool_exhaustion',
    DELIVERY_LEASE_SECONDS: '5',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_CONCURRENCY: '1',
    // A job that fails even once is dead-lettered: the batch's wait for a connection must not fail it.
    DELIVERY_RETRY_LIMIT: '0',
  },
});

describe("a batch that waits longer than the pool's connect timeout for a connection", () => {
  it.for(['claim', 'settle'] as const)(
    'waiting to %s: runs again once the pool is free, no job failed or dead-lettered, billed once',
    { timeout: 90_000 },
    async (when, { ctx, emulator, databaseUrl }) => {
      const org = await createOrganization(ctx.db);
      // The queue was made with the default limit: its jobs now take this one.
      await ctx.boss.updateQueue('meter-delivery', { retryLimit: 0 });
      // The worker's pool as production makes it (connectionTimeoutMillis 5 s), with one connection, as
      // DB_POOL_MAX connections all held by slow claims are.
      const pool = createDatabase({
        connectionString: databaseUrl,
        max: 1,
        log: ctx.log,
        applicationName: 'test-exhausted-worker-pool',
      });
      let held: Promise<unknown> | undefined;
      let heldAt = 0;
      const hold = async () => {
        const client = await pool.pool.connect();
        heldAt = performance.now();
        held = client.query('SELECT pg_sleep($1)', [HOLD_SECONDS]).finally(() => client.release());
      };
      const real = createV1Transport(createStripeMeterClient(ctx.stripe!));
      let calls = 0;
      const transport: MeterTransport = {
        kind: 'v1',
        maxEventsPerCall: 1,
        send: async (events, options) => {
          calls += events.length;
          const outcomes = await real.send(events, options);
          // The settle, and the release after its failure, queue behind the held connection.
          if (when === 'settle' && !held) await hold();
          return outcomes;
        },
      };
      let exhausted = 0;
      const runtime = await startDelivery(
        {
          db: pool.db,
          boss: ctx.boss,
          stripe: ctx.stripe,
          config: ctx.config,
          clock: ctx.clock,
          log: ctx.log,
          openPool: ctx.openPool,
        },
        { transport, observer: { onPoolExhausted: () => exhausted++ } },
      );
      let deliveredAfterMs = 0;
      try {
        // The claim, and whatever the batch asks before it, queue behind the held connection.
        if (when === 'claim') await hold();
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 6, occurredAt: new Date() },
          { value: 1, occurredAt: new Date() },
        ]);
        await waitFor(
          'the rows delivered',
          async () =>
            (await outboxRowsOf(ctx.db, { customerId: org.customerId })).every(
              (r) => r.status === 'delivered',
            ),
          (HOLD_SECONDS + 30) * 1000,
        );
        deliveredAfterMs = performance.now() - heldAt;
      } finally {
        runtime.stop();
        await ctx.boss.offWork('meter-delivery');
        await held;
        await runtime.close?.();
        await pool.db.destroy();
      }
      console.log(
        `[pool exhaustion: ${when}] batches run again ${exhausted}, calls ${calls}, delivered ${Math.round(deliveredAfterMs)} ms after the pool was taken`,
      );
      // The batch was delivered only once the pool was free again.
      expect(held).toBeDefined();
      expect(deliveredAfterMs).toBeGreaterThan(HOLD_SECONDS * 1000);
      // No job of the key failed, was retried by pg-boss or went to the dead letters.
      const { rows: jobs } = await sql<{
        name: string;
        state: string;
        retry_count: number;
        retry_limit: number;
      }>`
        SELECT name, state, retry_count, retry_limit FROM pgboss.job
         WHERE name IN ('meter-delivery', 'meter-delivery-dead') AND data->>'customerId' = ${org.customerId}`.execute(
        ctx.db,
      );
      expect(jobs.length).toBeGreaterThanOrEqual(1);
      expect(
        jobs.filter((j) => j.name === 'meter-delivery-dead' || j.state === 'failed' || j.retry_count > 0),
      ).toEqual([]);
      // It ran again, counted in meterbox_delivery_pool_exhausted_total.
      expect(exhausted).toBeGreaterThanOrEqual(1);
      // The group was never failed, and no failed attempt was counted against it.
      const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
      expect(rows.map((r) => r.status)).toEqual(['delivered', 'delivered']);
      expect(rows.map((r) => [r.attempts, r.last_error])).toEqual([
        [ATTEMPTS, null],
        [ATTEMPTS, null],
      ]);
      // Billed once: a resend after the settle's failure carries the same identifier.
      const ledger = await compareWithEmulator(ctx.db, emulator);
      expect(ledger.duplicatesAccepted).toEqual([]);
      expect(ledger.perKey.filter((k) => k.key.endsWith(org.customerId))).toEqual([
        { key: `temperature_readings:${org.customerId}`, stripe: 7, outbox: 7 },
      ]);
    },
  );
});
