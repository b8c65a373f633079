// The claim limit (src/metering/claim-limit.ts): a process starts with two claims at once and, until a
// claim is slow, every claim that was not slow gives one more turn, up to every fetcher; a slow claim
// halves the limit once per round of claims and ends that start; quick claims give turns back; a waiting
// batch gets its turn in order as soon as one is free.
import { sql } from 'kysely';
import { describe, expect, it as unit } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import {
  adaptiveClaimLimit,
  type ClaimLimit,
  INITIAL_CLAIMS_AT_ONCE,
} from '../../src/metering/claim-limit.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

/** A limit of `max` fetchers that starts at `initial` claims at once (by default all of them). */
function limitAt(max = 8, leaseSeconds = 9, initial = max) {
  let now = 0;
  const limit = adaptiveClaimLimit({ max, leaseSeconds, now: () => now, initial });
  return { limit, at: (ms: number) => (now = ms) };
}

/** Whether `p` has settled after the queued callbacks ran. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true));
  await new Promise((r) => setImmediate(r));
  return done;
}

describe('the claim limit', () => {
  unit('starts with two claims at once: the first crowd of fetchers waits for their turns', async () => {
    expect(INITIAL_CLAIMS_AT_ONCE).toBe(2);
    let now = 0;
    const limit = adaptiveClaimLimit({ max: 8, leaseSeconds: 9, now: () => now });
    expect(limit.limit()).toBe(2);
    const crowd = Array.from({ length: 8 }, () => limit.acquire());
    const admitted = await Promise.all(crowd.map((p) => settled(p)));
    expect(admitted).toEqual([true, true, false, false, false, false, false, false]);
    // A claim that was not slow (2 s against a 9 s lease: not quick either) gives a turn while the start
    // lasts; the next fetcher in line is admitted.
    now = 2_000;
    limit.record(0, 2_000);
    expect(limit.limit()).toBe(3);
    expect(await settled(crowd[2] as Promise<unknown>)).toBe(true);
    expect(await settled(crowd[3] as Promise<unknown>)).toBe(false);
    for (const p of crowd) void p.then((give) => give());
  });

  unit('reaches every fetcher after a few claims on a healthy database', () => {
    const limit = adaptiveClaimLimit({ max: 8, leaseSeconds: 10, now: () => 0 });
    for (let i = 0; i < 6; i++) limit.record(0, 20);
    expect(limit.limit()).toBe(8);
    limit.record(0, 20);
    expect(limit.limit()).toBe(8);
  });

  unit('ends the start at the first slow claim: after it, only quick claims give turns', () => {
    let now = 0;
    const limit = adaptiveClaimLimit({ max: 8, leaseSeconds: 9, now: () => now });
    limit.record(0, 2_000);
    limit.record(0, 2_000);
    expect(limit.limit()).toBe(4);
    now = 10_000;
    limit.record(1, 4_000); // slow: over 3 s
    expect(limit.limit()).toBe(2);
    limit.record(10_001, 2_000); // neither slow nor quick: no longer a turn
    expect(limit.limit()).toBe(2);
    limit.record(10_002, 900); // quick
    expect(limit.limit()).toBe(3);
  });

  unit('a slow claim at one claim at once ends the start too', () => {
    const limit = adaptiveClaimLimit({ max: 8, leaseSeconds: 9, now: () => 0, initial: 1 });
    limit.record(0, 5_000);
    expect(limit.limit()).toBe(1);
    limit.record(0, 2_000);
    expect(limit.limit()).toBe(1);
  });

  unit('lets every fetcher claim at once while claims are quick', async () => {
    const { limit } = limitAt(8);
    const turns = await Promise.all(Array.from({ length: 8 }, () => limit.acquire()));
    for (const give of turns) give();
    limit.record(0, 50);
    expect(limit.limit()).toBe(8);
  });

  unit('halves on a slow claim, once for claims that ran together, down to one', () => {
    const { limit, at } = limitAt(8, 9); // slow: over 3 s; quick: under 1 s
    at(10_000);
    limit.record(0, 3_500);
    expect(limit.limit()).toBe(4);
    // Claims that started before that halving and were slow in the same crowd do not halve it again.
    limit.record(500, 9_000);
    limit.record(9_000, 3_100);
    expect(limit.limit()).toBe(4);
    // A claim that started after it, and was slow too, does.
    at(20_000);
    limit.record(10_001, 4_000);
    expect(limit.limit()).toBe(2);
    at(30_000);
    limit.record(20_001, 4_000);
    at(40_000);
    limit.record(30_001, 4_000);
    expect(limit.limit()).toBe(1);
  });

  unit('gives a turn back for each quick claim, up to every fetcher', () => {
    const { limit, at } = limitAt(4, 9);
    at(10_000);
    limit.record(0, 5_000);
    limit.record(10_001, 1_500); // neither slow nor quick: no change
    expect(limit.limit()).toBe(2);
    limit.record(10_002, 900);
    expect(limit.limit()).toBe(3);
    for (let i = 0; i < 5; i++) limit.record(10_003 + i, 10);
    expect(limit.limit()).toBe(4);
  });

  unit('makes a batch wait while the limit is taken, and admits the waiting in order', async () => {
    const { limit, at } = limitAt(4, 9);
    at(10_000);
    limit.record(0, 5_000);
    limit.record(10_001, 5_000);
    at(20_000);
    limit.record(10_002, 5_000);
    expect(limit.limit()).toBe(1);
    const first = await limit.acquire();
    const second = limit.acquire();
    const third = limit.acquire();
    expect(await settled(second)).toBe(false);
    first();
    first(); // giving a turn back twice frees one turn only
    expect(await settled(second)).toBe(true);
    expect(await settled(third)).toBe(false);
    // A quick claim raises the limit: the third is admitted without waiting for the second's turn.
    limit.record(20_001, 10);
    expect(await settled(third)).toBe(true);
    (await second)();
    (await third)();
    // Nothing running, nothing waiting: the next claims go at once up to the limit (2).
    const a = limit.acquire();
    const b = limit.acquire();
    const c = limit.acquire();
    expect([await settled(a), await settled(b), await settled(c)]).toEqual([true, true, false]);
  });
});

// Against real Postgres: a batch waits for its turn before its claim. Two batches of two organizations
// start together; each claim is held 1.5 s inside its statement (a trigger on the claim's identifier
// update records when each claim's transaction entered and left it). With the limit down to one, the
// second claim starts after the first has committed; without a limit the two run together.
const CLAIM_HOLD_SECONDS = 1.5;
const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_claim_limit',
    DELIVERY_LEASE_SECONDS: '9',
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

async function recordClaims(ctx: Context) {
  await sql`CREATE TABLE IF NOT EXISTS test_claim_spans (pid int NOT NULL, entered timestamptz NOT NULL, left_at timestamptz NOT NULL)`.execute(
    ctx.db,
  );
  await sql`DELETE FROM test_claim_spans`.execute(ctx.db);
  await sql`
    CREATE OR REPLACE FUNCTION test_claim_span() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE t timestamptz := clock_timestamp();
    BEGIN
      PERFORM pg_sleep(${sql.lit(CLAIM_HOLD_SECONDS)});
      INSERT INTO test_claim_spans VALUES (pg_backend_pid(), t, clock_timestamp());
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`DROP TRIGGER IF EXISTS test_claim_span ON meter_outbox`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_claim_span BEFORE UPDATE OF identifier ON meter_outbox
       FOR EACH ROW WHEN (OLD.identifier IS NULL AND NEW.identifier IS NOT NULL)
       EXECUTE FUNCTION test_claim_span()`.execute(ctx.db);
}

async function twoBatchesTogether(ctx: Context, claimLimit: ClaimLimit | undefined) {
  const orgs = [await createOrganization(ctx.db), await createOrganization(ctx.db)];
  for (const org of orgs)
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
  const jobs = [];
  for (const org of orgs) jobs.push(await takeQueuedJob(ctx, org));
  const deps = v1BatchDeps(ctx, claimLimit ? { claimLimit } : {});
  await Promise.all(jobs.map((job) => deliverBatch(deps, [job])));
  const spans = await sql<{ entered: Date; left_at: Date }>`
    SELECT entered, left_at FROM test_claim_spans ORDER BY entered`.execute(ctx.db);
  expect(spans.rows).toHaveLength(2);
  const [first, second] = spans.rows as [{ entered: Date; left_at: Date }, { entered: Date; left_at: Date }];
  for (const org of orgs)
    expect((await outboxRowsOf(ctx.db, org)).map((r) => r.status)).toEqual(['delivered']);
  return { first, second };
}

describe('a batch and the claim limit', () => {
  it('waits for its turn before its claim: with one turn, the second claim starts after the first ended', async ({
    ctx,
  }) => {
    await recordClaims(ctx);
    let now = 0;
    const limit = adaptiveClaimLimit({ max: 2, leaseSeconds: 9, now: () => now });
    now = 1;
    limit.record(0, 10_000);
    expect(limit.limit()).toBe(1);
    const { first, second } = await twoBatchesTogether(ctx, limit);
    expect(second.entered.getTime()).toBeGreaterThanOrEqual(first.left_at.getTime());
    // Each claim was neither slow nor quick for a 9 s lease (1.5 s): the limit stays where it was.
    expect(limit.limit()).toBe(1);
  });

  it('without a limit, the same two claims run together (what the case above rules out)', async ({ ctx }) => {
    await recordClaims(ctx);
    const { first, second } = await twoBatchesTogether(ctx, undefined);
    expect(second.entered.getTime()).toBeLessThan(first.left_at.getTime());
  });
});
