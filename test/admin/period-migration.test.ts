// The period-boundary cut-over's decisions and how it lives with the hour-boundary commands: where it
// cuts (pure), what it stores, an earlier hour-boundary cut-over or `destinations set` replacing it,
// and the refusals an operator meets.
import { sql } from 'kysely';
import { describe, expect, it as plain } from 'vitest';
import {
  cutOver,
  listIntervals,
  setDestination,
  startParallel,
  startPeriodParallel,
} from '../../src/admin/destinations.js';
import { destinationsStartParallelCommand } from '../../src/admin/destinations-cli.js';
import { periodEndAfter, planPeriodCutOver, type StripeBillingPeriod } from '../../src/billing/periods.js';
import { createOrganization, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

const period = (start: string, end: string, anchor = end): StripeBillingPeriod => ({
  subscriptionId: 'sub_test',
  periodStart: new Date(start),
  periodEnd: new Date(end),
  anchor: new Date(anchor),
  interval: 'month',
  intervalCount: 1,
});

const view = (intervals: Awaited<ReturnType<typeof listIntervals>>) =>
  intervals.map((i) => [
    i.destination,
    i.role,
    i.from?.toISOString() ?? null,
    i.until?.toISOString() ?? null,
  ]);

describe('period-boundary cut-over', () => {
  plain('cuts at the end of the first period the parallel run covers whole', () => {
    const p = period('2026-01-31T09:00:00Z', '2026-02-28T09:00:00Z', '2026-01-31T09:00:00Z');
    // Started mid-period: the current period is not shadowed whole, the next one is.
    const plan = planPeriodCutOver(p, new Date('2026-02-10T10:00:00Z'), new Date('2026-02-10T10:00:00Z'));
    expect([plan.periodStart, plan.periodEnd, plan.cutOverAt].map((d) => d.toISOString())).toEqual([
      '2026-02-28T09:00:00.000Z',
      '2026-03-31T09:00:00.000Z',
      '2026-03-31T09:00:00.000Z',
    ]);
    expect(plan.aligned).toBe(true);
    // A parallel run under way since before the period began: the current period ends it.
    const early = planPeriodCutOver(p, new Date('2026-01-31T09:00:00Z'), new Date('2026-02-10T10:00:00Z'));
    expect(early.cutOverAt.toISOString()).toBe('2026-02-28T09:00:00.000Z');
    // A period ending off the hour: the hour boundary before it, said so.
    const odd = planPeriodCutOver(
      period('2026-03-05T10:17:42Z', '2026-04-05T10:17:42Z', '2026-03-05T10:17:42Z'),
      new Date('2026-03-01T00:00:00Z'),
      new Date('2026-03-01T00:00:00Z'),
    );
    expect([odd.cutOverAt.toISOString(), odd.aligned]).toEqual(['2026-04-05T10:00:00.000Z', false]);
    expect(
      periodEndAfter(
        new Date('2026-01-31T09:00:00Z'),
        new Date('2026-03-31T09:00:00Z'),
        'month',
        1,
      ).toISOString(),
    ).toBe('2026-04-30T09:00:00.000Z');
  });

  it('stores the plan and its intervals; an earlier hour-boundary cut-over or a set replaces it', async ({
    ctx,
  }) => {
    const now = new Date('2026-02-10T09:20:00Z');
    const p = period('2026-01-28T00:00:00Z', '2026-02-28T00:00:00Z');
    const org = await createOrganization(ctx.db);
    const change = await startPeriodParallel(ctx.db, org.organizationId, 'metronome', p, { now });
    expect(change.plan.cutOverAt.toISOString()).toBe('2026-03-28T00:00:00.000Z');
    expect(view(change.intervals)).toEqual([
      ['stripe', 'billing', null, '2026-03-28T00:00:00.000Z'],
      ['metronome', 'shadow', '2026-02-10T10:00:00.000Z', '2026-03-28T00:00:00.000Z'],
      ['metronome', 'billing', '2026-03-28T00:00:00.000Z', null],
    ]);
    expect((await startPeriodParallel(ctx.db, org.organizationId, 'metronome', p, { now })).unchanged).toBe(
      true,
    );

    // The operator cuts over earlier, at an hour boundary: from there Metronome alone, no plan left.
    const cut = await cutOver(ctx.db, org.organizationId, { now: new Date('2026-03-01T12:30:00Z') });
    expect(cut.at.toISOString()).toBe('2026-03-01T13:00:00.000Z');
    expect(view(await listIntervals(ctx.db, org.organizationId))).toEqual([
      ['stripe', 'billing', null, '2026-03-01T13:00:00.000Z'],
      ['metronome', 'shadow', '2026-02-10T10:00:00.000Z', '2026-03-01T13:00:00.000Z'],
      ['metronome', 'billing', '2026-03-01T13:00:00.000Z', null],
    ]);
    const { rows } = await sql`SELECT 1 FROM organization_period_migrations
                                WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    expect(rows).toHaveLength(0);

    // Another organization: `destinations set metronome` before the period end is a change, not "unchanged".
    const other = await createOrganization(ctx.db);
    await startPeriodParallel(ctx.db, other.organizationId, 'metronome', p, { now });
    const set = await setDestination(ctx.db, other.organizationId, 'metronome', {
      now: new Date('2026-02-20T08:00:00Z'),
    });
    expect(set.unchanged).toBeUndefined();
    expect(view(set.intervals)).toEqual([
      ['stripe', 'billing', null, '2026-02-20T09:00:00.000Z'],
      ['metronome', 'shadow', '2026-02-10T10:00:00.000Z', '2026-02-20T09:00:00.000Z'],
      ['metronome', 'billing', '2026-02-20T09:00:00.000Z', null],
    ]);
  });

  it('keeps the start of a parallel run under way, and refuses what the runbook does not cover', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await startParallel(ctx.db, org.organizationId, 'metronome', { now: new Date('2026-01-20T09:00:00Z') });
    const p = period('2026-01-28T00:00:00Z', '2026-02-28T00:00:00Z');
    const change = await startPeriodParallel(ctx.db, org.organizationId, 'metronome', p, {
      now: new Date('2026-02-10T09:20:00Z'),
    });
    // The run began before this period: it is shadowed whole and ends the migration.
    expect(change.plan.cutOverAt.toISOString()).toBe('2026-02-28T00:00:00.000Z');
    expect(view(change.intervals)[1]).toEqual([
      'metronome',
      'shadow',
      '2026-01-20T10:00:00.000Z',
      '2026-02-28T00:00:00.000Z',
    ]);
    const toStripe = await createOrganization(ctx.db);
    await expect(
      startPeriodParallel(ctx.db, toStripe.organizationId, 'stripe', p, {
        now: new Date('2026-02-10T09:20:00Z'),
      }),
    ).rejects.toThrow(/billed by Stripe to Metronome/);

    // From the CLI, an organization without a Stripe subscription id: one sentence, exit 1.
    const io = memoryIo();
    const code = await destinationsStartParallelCommand(
      ctx,
      { organization: org.organizationId, to: 'metronome', 'cut-over': 'period-end' },
      io,
    );
    expect(code).toBe(1);
    expect(io.stderr).toMatch(/STRIPE_SECRET_KEY is not set|no Stripe subscription linked/);
    const bad = memoryIo();
    expect(
      await destinationsStartParallelCommand(
        ctx,
        { organization: org.organizationId, to: 'metronome', 'cut-over': 'day' },
        bad,
      ),
    ).toBe(2);
  });
});
