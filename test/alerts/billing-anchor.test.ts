// A configured billing period (organizations.billing_anchor_date): a Metronome organization's
// thresholds count in monthly periods from its anchor instead of UTC months; the anchored period's end
// re-arms them (rollover), and setting or clearing the anchor re-counts them into the period it gives.
// Real Postgres, the admin API and the CLI, a fake clock.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { thresholdsPeriodCommand } from '../../src/admin/alerts-cli.js';
import { listThresholds } from '../../src/alerts/threshold-admin.js';
import { storeRequest } from '../../src/ingest/group-commit.js';
import { authHeaders, createSensors, memoryIo, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const TOKEN = 'billing-anchor-admin-token-0123456';
let now = new Date('2026-11-14T20:00:00Z');
const clock = { now: () => new Date(now) };
const it = contextTest({ env: { ADMIN_TOKEN: TOKEN }, overrides: { clock } });

describe('the billing anchor of a Metronome organization', () => {
  it('counts thresholds in the anchored month, re-arms them at its end, and re-counts when cleared', async ({
    app,
    ctx,
    org,
  }) => {
    const id = org.organizationId;
    // Metronome bills it: the Stripe subscription's period does not apply.
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              VALUES (${id}, 'metronome', 'billing', '-infinity')`.execute(ctx.db);
    const [sensor] = await createSensors(ctx.db, id, 1);
    let second = 0;
    const ingest = async (n: number) => {
      const readings = Array.from({ length: n }, () => reading(sensor!, 3000 - second++, 4, now));
      const out = await ctx.db
        .transaction()
        .execute((trx) => storeRequest(trx, ctx.boss, { organizationId: id, readings }, clock.now()));
      expect(out).toEqual({ stored: true, result: { inserted: n, duplicates: 0 } });
    };
    const crossedEvents = async () =>
      (
        await sql<{ start: string }>`
          SELECT payload->'data'->'period'->>'start' AS start FROM alert_events
           WHERE organization_id = ${id} AND type = 'usage.threshold.crossed' ORDER BY seq`.execute(ctx.db)
      ).rows.map((r) => r.start);

    const before = await app.request(`/admin/organizations/${id}/billing-anchor`, {
      headers: authHeaders(TOKEN),
    });
    expect(await before.json()).toEqual({
      organizationId: id,
      billingAnchorDate: null,
      period: { start: '2026-11-01T00:00:00.000Z', end: '2026-12-01T00:00:00.000Z' },
    });
    const put = await app.request(`/admin/organizations/${id}/billing-anchor`, {
      method: 'PUT',
      headers: authHeaders(TOKEN),
      body: JSON.stringify({ billingAnchorDate: '2026-01-15T00:00:00Z' }),
    });
    expect(put.status).toBe(200);
    expect(await put.json()).toEqual({
      organizationId: id,
      billingAnchorDate: '2026-01-15T00:00:00.000Z',
      period: { start: '2026-10-15T00:00:00.000Z', end: '2026-11-15T00:00:00.000Z' },
    });

    const add = await app.request(`/admin/organizations/${id}/alert-thresholds`, {
      method: 'POST',
      headers: authHeaders(TOKEN),
      body: JSON.stringify({ quantity: 3 }),
    });
    expect(add.status).toBe(201);
    await ingest(3);
    expect(await crossedEvents()).toEqual(['2026-10-15T00:00:00.000Z']);

    // Past the anchor's day: a new period (under UTC months it would still be November's). Its first
    // reading starts the count from zero; two more cross the threshold again, once.
    now = new Date('2026-11-15T01:00:00Z');
    await ingest(1);
    const [rolled] = await listThresholds(ctx.db, id, clock.now());
    expect(rolled).toMatchObject({
      usage: 1,
      state: 'armed',
      periodStart: '2026-11-15T00:00:00.000Z',
      periodEnd: '2026-12-15T00:00:00.000Z',
    });
    await ingest(2);
    expect(await crossedEvents()).toEqual(['2026-10-15T00:00:00.000Z', '2026-11-15T00:00:00.000Z']);

    // Cleared from the CLI: UTC months again, the threshold re-counted into November (all six
    // readings), crossed without an event.
    const io = memoryIo();
    expect(await thresholdsPeriodCommand(ctx, { organization: id, clear: true }, io)).toBe(0);
    expect(io.stdout).toContain('period 2026-11-01T00:00:00.000Z – 2026-12-01T00:00:00.000Z (UTC months');
    const [cleared] = await listThresholds(ctx.db, id, clock.now());
    expect(cleared).toMatchObject({ usage: 6, state: 'crossed', periodStart: '2026-11-01T00:00:00.000Z' });
    expect(await crossedEvents()).toHaveLength(2);

    // And set again from the CLI: the anchored period holds the last three readings.
    const again = memoryIo();
    expect(
      await thresholdsPeriodCommand(ctx, { organization: id, anchor: '2026-01-15T00:00:00Z' }, again),
    ).toBe(0);
    expect(again.stdout).toContain('monthly from 2026-01-15T00:00:00.000Z');
    const [anchored] = await listThresholds(ctx.db, id, clock.now());
    expect(anchored).toMatchObject({ usage: 3, state: 'crossed', periodStart: '2026-11-15T00:00:00.000Z' });
  });

  it('refuses an anchor that is not an instant, and an unknown organization', async ({ app, org }) => {
    const bad = await app.request(`/admin/organizations/${org.organizationId}/billing-anchor`, {
      method: 'PUT',
      headers: authHeaders(TOKEN),
      body: JSON.stringify({ billingAnchorDate: '15th of the month' }),
    });
    expect(bad.status).toBe(422);
    const unknown = await app.request(
      '/admin/organizations/00000000-0000-4000-8000-000000000000/billing-anchor',
      {
        method: 'PUT',
        headers: authHeaders(TOKEN),
        body: JSON.stringify({ billingAnchorDate: null }),
      },
    );
    expect(unknown.status).toBe(404);
  });
});
