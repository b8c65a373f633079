// A receiver that is down for an hour (or a day) still gets its alerts: with the default settings an
// alert delivery is retried by pg-boss's own backoff for about three days before it is dead-lettered
// (docs/alerts.md, "Retries, dead letters, redrive"). webhooks.test.ts shows the order and the once-each
// after a receiver comes back, on one-second delays; this file holds the default schedule itself to that
// promise, through pg-boss's real retry statement: each failed attempt's next start is read from the job
// row, then brought forward so the test need not wait for it.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { enqueueAlertDeliveries } from '../../src/alerts/events.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { contextTest } from '../support/test.js';

// The default settings: WEBHOOK_RETRY_DELAY_SECONDS, WEBHOOK_RETRY_DELAY_MAX_SECONDS, WEBHOOK_RETRY_LIMIT
// left unset.
const it = contextTest();

describe('alert delivery retries with the default settings', () => {
  it('keep a refused delivery alive for about three days, past an hour of refusals, then dead-letter it', async ({
    ctx,
  }) => {
    expect(ctx.config.WEBHOOK_RETRY_LIMIT).toBe(21);
    await ensureQueues(ctx.boss, ctx.config);
    const key = { endpointId: 'we_retry_span', orderKey: 'org_retry_span' };
    await ctx.db.transaction().execute((trx) => enqueueAlertDeliveries(trx, ctx.boss, [key]));

    const delays: number[] = [];
    for (let attempt = 0; attempt <= ctx.config.WEBHOOK_RETRY_LIMIT + 1; attempt++) {
      const [job] = await ctx.boss.fetch('alert-delivery');
      if (!job) break;
      // The receiver refused: the handler throws, pg-boss fails the job (its retry statement).
      await ctx.boss.fail('alert-delivery', job.id, { message: 'connect ECONNREFUSED' });
      const row = await sql<{ state: string; wait: number | null }>`
        SELECT state::text AS state,
               CASE WHEN state = 'retry' THEN extract(epoch FROM start_after - now())::float8 END AS wait
          FROM pgboss.job WHERE name = 'alert-delivery' AND id = ${job.id}`.execute(ctx.db);
      const r = row.rows[0];
      expect(r).toBeDefined();
      if (r!.state !== 'retry') {
        expect(r!.state).toBe('failed');
        break;
      }
      delays.push(r!.wait!);
      // Due now: the next attempt without waiting for the backoff.
      await sql`UPDATE pgboss.job SET start_after = now() WHERE name = 'alert-delivery' AND id = ${job.id}`.execute(
        ctx.db,
      );
    }

    // One first attempt and 21 retries, each retry's wait at least the last one's (exponential, capped).
    expect(delays).toHaveLength(ctx.config.WEBHOOK_RETRY_LIMIT);
    for (let i = 1; i < delays.length; i++) expect(delays[i]!).toBeGreaterThan(delays[i - 1]! - 1);
    const hours = (s: number) => s / 3600;
    const total = delays.reduce((a, b) => a + b, 0);
    // 30 s × 2^n (up to twice that: pg-boss's jitter), capped at 6 h: 74–81 h in all.
    expect(hours(total)).toBeGreaterThan(72);
    expect(hours(total)).toBeLessThan(84);
    expect(Math.max(...delays)).toBeLessThanOrEqual(ctx.config.WEBHOOK_RETRY_DELAY_MAX_SECONDS + 1);
    // An hour of refusals uses at most 8 of the 22 attempts: the rest come after the receiver is back.
    let elapsed = 0;
    let attemptsInAnHour = 1;
    for (const d of delays) {
      elapsed += d;
      if (elapsed > 3600) break;
      attemptsInAnHour++;
    }
    expect(attemptsInAnHour).toBeLessThanOrEqual(8);
    expect(attemptsInAnHour).toBeLessThan(ctx.config.WEBHOOK_RETRY_LIMIT + 1);

    // Then the dead letter queue holds it, for an operator's redrive (webhooks.test.ts redrives one).
    const dead = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'alert-delivery-dead' AND data->>'orderKey' = ${key.orderKey}`.execute(ctx.db);
    expect(dead.rows[0]?.n).toBe(1);
  });
});
