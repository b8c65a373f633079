// v1.billing.meter.no_meter_found (Stripe's thin event for meter events whose event name has no
// meter): recorded like an error report, its sampled rows failed, and the worker's meter catalog
// notified by the event's transaction.
import pg from 'pg';
import { describe, expect } from 'vitest';
import { failReportedEvents, METER_CATALOG_CHANNEL } from '../../src/billing/meter-error-reports.js';
import { processStripeEvent } from '../../src/billing/process.js';
import { writeRows } from '../metering/delivery-helpers.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();

describe('v1.billing.meter.no_meter_found', () => {
  it('records the report, fails the sampled row and NOTIFYs the meter catalog at commit', async ({
    ctx,
    org,
  }) => {
    const [id] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
    ]);
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', identifier: 'mb_lost_1', delivered_at: new Date() })
      .where('id', '=', id!)
      .execute();
    const listener = new pg.Client({ connectionString: ctx.config.DATABASE_URL });
    await listener.connect();
    const notified: string[] = [];
    listener.on('notification', (n) => notified.push(n.channel));
    await listener.query(`LISTEN ${METER_CATALOG_CHANNEL}`);
    try {
      const object = {
        id: 'evt_no_meter_1',
        object: 'v2.core.event',
        type: 'v1.billing.meter.no_meter_found',
        created: new Date().toISOString(),
        livemode: false,
        data: {
          developer_message_summary: 'No meter for event name temperature_readings',
          reason: {
            error_count: 1,
            error_types: [
              {
                code: 'no_meter',
                sample_errors: [{ error_message: 'no meter', request: { identifier: 'mb_lost_1' } }],
              },
            ],
          },
        },
      };
      const result = await processStripeEvent(
        ctx.db,
        {
          id: object.id,
          type: object.type,
          created: new Date(),
          livemode: false,
          kind: 'thin',
          object,
          raw: JSON.stringify(object),
        },
        { log: ctx.log, clock: ctx.clock },
      );
      expect(result).toMatchObject({ duplicate: false, outcome: 'applied' });
      await waitFor('the catalog notification', () => notified.length === 1);
      const row = await ctx.db
        .selectFrom('meter_outbox')
        .select(['status', 'last_error'])
        .where('id', '=', id!)
        .executeTakeFirstOrThrow();
      expect(row.status).toBe('failed');
      expect(row.last_error).toMatch(/^stripe error report: no_meter/);
      const report = await ctx.db
        .selectFrom('meter_error_reports')
        .select(['event_id', 'error_count'])
        .execute();
      expect(report).toEqual([{ event_id: 'evt_no_meter_1', error_count: 1 }]);
    } finally {
      await listener.end();
    }
  });

  it('fails rows whose call Stripe received before their answer was settled (the report came first), and no row it does not name', async ({
    ctx,
    org,
  }) => {
    // Two rows of one key: one sent under an identifier whose answer the worker has not settled yet
    // (frozen, or a slow settle), one not yet claimed.
    const [sent, unsent] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
      { value: 2, occurredAt: new Date() },
    ]);
    await ctx.db
      .updateTable('meter_outbox')
      .set({ identifier: 'mb_inflight_1', identified_at: new Date() })
      .where('id', '=', sent!)
      .execute();
    const changed = await ctx.db.transaction().execute((trx) =>
      failReportedEvents(trx, [
        {
          code: 'no_meter',
          sample_errors: [{ error_message: 'no meter', request: { identifier: 'mb_inflight_1' } }],
        },
      ]),
    );
    expect(changed).toBe(1);
    // The settle that comes after it changes pending rows only: the row stays failed, not delivered.
    const settled = await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', delivered_at: new Date() })
      .where('identifier', '=', 'mb_inflight_1')
      .where('status', '=', 'pending')
      .executeTakeFirst();
    expect(Number(settled.numUpdatedRows)).toBe(0);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['id', 'status', 'last_error'])
      .where('id', 'in', [sent!, unsent!])
      .orderBy('id')
      .execute();
    expect(rows.map((r) => [r.id, r.status])).toEqual([
      [sent, 'failed'],
      [unsent, 'pending'],
    ]);
    expect(rows[0]?.last_error).toMatch(/^stripe error report: no_meter: no meter/);
  });
});
