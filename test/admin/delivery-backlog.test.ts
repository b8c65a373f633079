// The dashboard's backlog and delivery lag over the last hour, derived from the outbox alone.
import { describe, expect } from 'vitest';
import { pipelineOverview } from '../../src/admin/outbox.js';
import { signIn } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const TOKEN = 'backlog-admin-token-0123456789ab';
const it = contextTest({ env: { ADMIN_TOKEN: TOKEN } });

const MIN = 60_000;

describe('backlog and delivery lag, last hour', () => {
  it('counts rows committed and not yet delivered at each minute, and the lag of the rows delivered in it', async ({
    ctx,
    app,
    org,
  }) => {
    const now = new Date();
    const ago = (m: number) => new Date(now.getTime() - m * MIN);
    let n = 0;
    const row = (createdAt: Date, status: 'pending' | 'delivered', deliveredAt: Date | null) => ({
      identifier: deliveredAt ? `mb_tr_backlog_${n++}` : null,
      organization_id: org.organizationId,
      event_name: 'temperature_readings' as const,
      stripe_customer_id: org.customerId,
      value: 1,
      occurred_at: createdAt,
      created_at: createdAt,
      status,
      delivered_at: deliveredAt,
    });
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        row(ago(30), 'pending', null),
        row(ago(20), 'delivered', ago(10)), // 10 min lag
        row(ago(12), 'delivered', ago(10)), // 2 min lag, same minute
      ])
      .execute();
    const o = await pipelineOverview(ctx.db, ctx.boss, now);
    expect(o.backlogPerMinute).toHaveLength(60);
    const at = (m: number) => {
      const t = ago(m).getTime();
      return o.backlogPerMinute.find((b) => b.minute.getTime() <= t && t < b.minute.getTime() + MIN)!;
    };
    expect(at(25).backlog).toBe(1);
    expect(at(15).backlog).toBe(2);
    expect(at(11).backlog).toBe(3);
    expect(at(10).maxLagMs).toBeCloseTo(10 * MIN, -2);
    expect(at(10).avgLagMs).toBeCloseTo(6 * MIN, -2);
    expect(at(5).backlog).toBe(1);
    expect(at(5).maxLagMs).toBeNull();
    expect(o.backlogPerMinute.at(-1)!.backlog).toBe(1);

    const cookie = await signIn(app, TOKEN);
    const page = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(page).toContain('backlog now 1 rows (peak 3)');
    expect(page).toContain('max delivery lag 600.0 s');
  });
});
