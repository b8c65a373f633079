// The threshold counter (migration 0082): ingestion adds an organization's readings to one row, its
// counter, however many thresholds it has, and keeps the billing period on it while the period's
// inputs stay as they were. These check what that must not change: a period moved by a subscription
// change, by a destination change or by the time a stored Metronome interval starts is seen at the next
// count (re-armed as before); concurrent first counts of a period lose nothing; a threshold created while
// a request waits for the counter gets its crossing; the thresholds' rows are written only at a crossing. Real Postgres, the functions the webhook handler and the admin API call.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { setDestination } from '../../src/admin/destinations.js';
import { createThreshold, listThresholds, recountReadings } from '../../src/alerts/threshold-admin.js';
import { applySubscriptionChange, lockSubscriptionRow } from '../../src/billing/subscriptions.js';
import type { Context } from '../../src/context.js';
import { storeRequest } from '../../src/ingest/group-commit.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();

/** Stores `n` new readings of `sensor` at `now` (recorded in the minutes before it), in one transaction. */
function ingester(ctx: Context, organizationId: string, sensor: string) {
  let second = 0;
  return async (n: number, now: Date) => {
    const readings = Array.from({ length: n }, () => ({
      sensorId: sensor,
      recordedAt: new Date(now.getTime() - 600_000 + second++ * 1000).toISOString(),
      temperatureC: 4,
    }));
    const out = await ctx.db
      .transaction()
      .execute((trx) => storeRequest(trx, ctx.boss, { organizationId, readings }, now));
    expect(out).toEqual({ stored: true, result: { inserted: n, duplicates: 0 } });
  };
}

async function crossings(ctx: Context, organizationId: string) {
  return (
    await sql<{ quantity: string; usage: string; start: string }>`
      SELECT payload->'data'->'threshold'->>'quantity' AS quantity, payload->'data'->>'usage' AS usage,
             payload->'data'->'period'->>'start' AS start
        FROM alert_events WHERE organization_id = ${organizationId} AND type = 'usage.threshold.crossed'
       ORDER BY seq`.execute(ctx.db)
  ).rows.map((r) => [Number(r.quantity), Number(r.usage), r.start]);
}

const monthStart = (at: Date) => new Date(Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), 1)).toISOString();

describe('threshold counters', () => {
  it('counts into one row and writes a threshold only when the count crosses it', async ({ ctx, org }) => {
    const id = org.organizationId;
    const [sensor] = await createSensors(ctx.db, id, 1);
    const now = new Date();
    for (const quantity of [4, 6, 100]) await createThreshold(ctx.db, id, { quantity }, now);
    const ingest = ingester(ctx, id, sensor!);
    const rowsOf = async () =>
      (
        await sql<{ q: string; u: string; state: string }>`
          SELECT quantity::text AS q, period_usage::text AS u, state FROM alert_thresholds
           WHERE organization_id = ${id} ORDER BY quantity`.execute(ctx.db)
      ).rows.map((r) => [Number(r.q), Number(r.u), r.state]);
    await ingest(2, now);
    await ingest(1, now);
    // Three readings counted, below every quantity: the counter holds them, no threshold row was written.
    expect((await listThresholds(ctx.db, id, now)).map((t) => t.usage)).toEqual([3, 3, 3]);
    expect(await rowsOf()).toEqual([
      [4, 0, 'armed'],
      [6, 0, 'armed'],
      [100, 0, 'armed'],
    ]);
    // 3 → 7 crosses 4 and 6 in one request: both written, one event each; 100 untouched.
    await ingest(4, now);
    expect(await rowsOf()).toEqual([
      [4, 7, 'crossed'],
      [6, 7, 'crossed'],
      [100, 0, 'armed'],
    ]);
    expect((await crossings(ctx, id)).map(([q, u]) => [q, u])).toEqual([
      [4, 7],
      [6, 7],
    ]);
  });

  it('loses nothing when concurrent requests make the counter of a period', async ({ ctx, org }) => {
    const id = org.organizationId;
    const [sensor] = await createSensors(ctx.db, id, 1);
    const now = new Date();
    await createThreshold(ctx.db, id, { quantity: 95 }, now);
    // No counter (as for a threshold a previous release created): the first requests create it at once.
    await sql`DELETE FROM alert_usage_counters WHERE organization_id = ${id}`.execute(ctx.db);
    const base = now.getTime() - 3_600_000;
    await Promise.all(
      Array.from({ length: 20 }, (_, r) =>
        ctx.db.transaction().execute((trx) =>
          storeGroup(
            trx,
            ctx.boss,
            [
              {
                organizationId: id,
                readings: Array.from({ length: 10 }, (_, i) => ({
                  sensorId: sensor!,
                  recordedAt: new Date(base + (r * 10 + i) * 1000).toISOString(),
                  temperatureC: 4,
                })),
              },
            ],
            now,
          ),
        ),
      ),
    );
    const [t] = await listThresholds(ctx.db, id, now);
    expect(t).toMatchObject({ usage: 200, state: 'crossed' });
    const events = await crossings(ctx, id);
    expect(events).toHaveLength(1);
    expect(events[0]![1]).toBeGreaterThanOrEqual(95);
    expect(events[0]![1]).toBeLessThan(105);
  });

  it('sees a threshold created while a request waits for the counter, and sends its crossing', async ({
    ctx,
    org,
  }) => {
    const id = org.organizationId;
    const [sensor] = await createSensors(ctx.db, id, 1);
    const now = new Date();
    await createThreshold(ctx.db, id, { quantity: 100 }, now);
    const ingest = ingester(ctx, id, sensor!);
    await ingest(3, now);
    // A threshold of 5 created as createThreshold creates one (the counter's lock, the re-count, the row),
    // its transaction held open while a request of four readings (3 → 7) starts and waits for the lock.
    let released = false;
    const release = () => {
      released = true;
    };
    let created = false;
    const creating = ctx.db.transaction().execute(async (trx) => {
      const { period, usage } = await recountReadings(trx, id, now);
      await sql`INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end,
                                              period_usage)
                VALUES (${id}, 'temperature_readings', 5, ${period.start}, ${period.end}, ${usage})`.execute(
        trx,
      );
      created = true;
      // Busy, not idle in transaction (the test database ends idle transactions), until released.
      while (!released) await sql`SELECT pg_sleep(0.02)`.execute(trx);
    });
    let storing: Promise<void> | undefined;
    try {
      await waitFor('the threshold row', () => created);
      storing = ingest(4, now);
      await waitFor('the request waiting for the counter', async () => {
        const waiting = await sql<{ n: number }>`
          SELECT count(*)::int AS n FROM pg_stat_activity
           WHERE datname = current_database() AND wait_event_type = 'Lock'
             AND query LIKE '%WITH input AS MATERIALIZED%'`.execute(ctx.db);
        return waiting.rows[0]!.n > 0;
      });
    } finally {
      release();
      await creating;
      await storing;
    }
    // The request's statement began before the threshold existed; the crossing is still found and sent.
    expect((await crossings(ctx, id)).map(([q, u]) => [q, u])).toEqual([[5, 7]]);
    expect((await listThresholds(ctx.db, id, now)).map((t) => [t.quantity, t.usage, t.state])).toEqual([
      [5, 7, 'crossed'],
      [100, 7, 'armed'],
    ]);
  });

  it("counts in the subscription's new period after a subscription change, from zero", async ({
    ctx,
    org,
  }) => {
    const id = org.organizationId;
    const [sensor] = await createSensors(ctx.db, id, 1);
    const now = new Date();
    await createThreshold(ctx.db, id, { quantity: 5 }, now);
    const ingest = ingester(ctx, id, sensor!);
    await ingest(3, now);
    expect((await listThresholds(ctx.db, id, now))[0]).toMatchObject({
      usage: 3,
      periodStart: monthStart(now),
    });
    // Stripe tells a period (its month ends in ten days): applied as the webhook handler applies it.
    const end = new Date(now.getTime() + 10 * 86_400_000);
    await ctx.db.transaction().execute(async (trx) => {
      const row = await lockSubscriptionRow(trx, id);
      const { decision } = await applySubscriptionChange(
        trx,
        row,
        {
          source: 'customer.subscription.updated',
          created: new Date(),
          subscriptionId: 'sub_threshold_counter',
          customerId: null,
          status: 'active',
          currentPeriodEnd: end,
        },
        now,
      );
      expect(decision.apply).toBe(true);
    });
    const stripeStart = new Date(
      (await sql<{ s: Date }>`SELECT ${end}::timestamptz - interval '1 month' AS s`.execute(ctx.db)).rows[0]!
        .s,
    ).toISOString();
    // The next request counts in the subscription's period: another start, so from zero (re-armed).
    await ingest(2, now);
    expect((await listThresholds(ctx.db, id, now))[0]).toMatchObject({
      usage: 2,
      state: 'armed',
      periodStart: stripeStart,
      periodEnd: end.toISOString(),
    });
    await ingest(3, now);
    expect(await crossings(ctx, id)).toEqual([[5, 5, stripeStart]]);
  });

  it('counts in the UTC month once a Metronome billing interval starts, stored or set later', async ({
    ctx,
    org,
  }) => {
    const now = new Date();
    const end = new Date(now.getTime() + 10 * 86_400_000);
    await sql`UPDATE subscriptions SET current_period_end = ${end} WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    const later = new Date(now.getTime() + 2 * 3_600_000);
    const run = async (organizationId: string, setLater: boolean) => {
      const [sensor] = await createSensors(ctx.db, organizationId, 1);
      const ingest = ingester(ctx, organizationId, sensor!);
      if (!setLater) await setDestination(ctx.db, organizationId, 'metronome', { now });
      const created = await createThreshold(ctx.db, organizationId, { quantity: 50 }, now);
      await ingest(3, now);
      // setDestination: Metronome bills from the next hour boundary; Stripe's period holds until then.
      if (setLater) await setDestination(ctx.db, organizationId, 'metronome', { now });
      await ingest(2, now);
      expect((await listThresholds(ctx.db, organizationId, now))[0]).toMatchObject({
        usage: 5,
        periodStart: created.periodStart,
      });
      expect(created.periodEnd).toBe(end.toISOString());
      // Two hours on, Metronome bills it: its period is the UTC month now (another start: from zero).
      await ingest(1, later);
      expect((await listThresholds(ctx.db, organizationId, later))[0]).toMatchObject({
        usage: 1,
        periodStart: monthStart(later),
      });
    };
    // The interval stored before the count began (the counter's span ends where it starts) ...
    await run(org.organizationId, false);
    // ... and one set after it (the change forgets the counter's period).
    const other = await createOrgLike(ctx, end);
    await run(other, true);
  });
});

/** Another billable organization whose Stripe subscription's period ends at `end`. */
async function createOrgLike(ctx: Context, end: Date): Promise<string> {
  const org = await createOrganization(ctx.db);
  await sql`UPDATE subscriptions SET current_period_end = ${end} WHERE organization_id = ${org.organizationId}`.execute(
    ctx.db,
  );
  return org.organizationId;
}
