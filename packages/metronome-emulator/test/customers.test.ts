// Customers and ingest aliases through the SDK, and what happens to usage for a customer_id nobody
// has: accepted, kept as unmatched, and attributed once a customer gets that alias (or moves it).
import { ConflictError, NotFoundError } from '@metronome/sdk';
import { describe, expect } from 'vitest';
import { apiError, emulatorTest, HOUR, manualClock, reading } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 10, 30, 0);
const clock = manualClock(start);
const it = emulatorTest(clock, start);
const TEN = Date.UTC(2026, 10, 21, 10, 0, 0);

describe('customers', () => {
  it('creates a customer with ingest aliases and reads it back', async ({ metronome }) => {
    const created = await metronome.v1.customers.create({
      name: 'Cold Chain Ltd',
      ingest_aliases: ['org-1', 'org-1-eu'],
      custom_fields: { plan: 'pro' },
    });
    expect(created.data).toEqual({
      id: expect.stringMatching(/^[0-9a-f-]{36}$/),
      external_id: 'org-1',
      ingest_aliases: ['org-1', 'org-1-eu'],
      name: 'Cold Chain Ltd',
      custom_fields: { plan: 'pro' },
    });
    const fetched = await metronome.v1.customers.retrieve({ customer_id: created.data.id });
    expect(fetched.data).toMatchObject({
      id: created.data.id,
      ingest_aliases: ['org-1', 'org-1-eu'],
      created_at: new Date(start).toISOString(),
      archived_at: null,
      customer_config: { salesforce_account_id: null },
    });
    const missing = await apiError(() => metronome.v1.customers.retrieve({ customer_id: 'nope' }));
    expect(missing).toBeInstanceOf(NotFoundError);
  });

  it('refuses an alias another customer holds with 409, an archived one included', async ({ metronome }) => {
    const first = await metronome.v1.customers.create({ name: 'a', ingest_aliases: ['shared'] });
    const err = await apiError(() =>
      metronome.v1.customers.create({ name: 'b', ingest_aliases: ['shared'] }),
    );
    expect(err).toBeInstanceOf(ConflictError);
    expect(err.error).toEqual({ message: 'Ingest alias shared is already in use by another customer' });
    await metronome.v1.customers.archive({ id: first.data.id });
    expect(
      (await apiError(() => metronome.v1.customers.create({ name: 'c', ingest_aliases: ['shared'] }))).status,
    ).toBe(409);
  });

  it('lists customers by alias and by ids, active ones unless asked, a page at a time', async ({
    metronome,
  }) => {
    const made = [];
    for (const n of [1, 2, 3])
      made.push((await metronome.v1.customers.create({ name: `c${n}`, ingest_aliases: [`org-${n}`] })).data);
    await metronome.v1.customers.archive({ id: made[2]!.id });

    const byAlias = await metronome.v1.customers.list({ ingest_alias: 'org-2' });
    expect(byAlias.data.map((c) => c.name)).toEqual(['c2']);
    const byIds = await metronome.v1.customers.list({ customer_ids: [made[0]!.id, made[2]!.id] });
    expect(byIds.data.map((c) => c.name)).toEqual(['c1']);
    const archived = await metronome.v1.customers.list({ only_archived: true });
    expect(archived.data.map((c) => c.name)).toEqual(['c3']);

    const firstPage = await metronome.v1.customers.list({ limit: 1 });
    expect(firstPage.data.map((c) => c.name)).toEqual(['c1']);
    expect(firstPage.next_page).not.toBe('');
    const all: string[] = [];
    for await (const c of metronome.v1.customers.list({ limit: 1 })) all.push(c.name);
    expect(all).toEqual(['c1', 'c2']);
    expect((await apiError(() => metronome.v1.customers.list({ limit: 101 }))).status).toBe(400);
  });

  it('replaces the alias set, freeing the aliases it drops', async ({ emu, metronome }) => {
    const a = await metronome.v1.customers.create({ name: 'a', ingest_aliases: ['x', 'y'] });
    const response = await metronome.v1.customers
      .setIngestAliases({ customer_id: a.data.id, ingest_aliases: ['y', 'z'] })
      .asResponse();
    expect(response.status).toBe(200);
    expect((await metronome.v1.customers.retrieve({ customer_id: a.data.id })).data.ingest_aliases).toEqual([
      'y',
      'z',
    ]);
    // x is free again; y is still a's.
    await metronome.v1.customers.create({ name: 'b', ingest_aliases: ['x'] });
    const err = await apiError(() =>
      metronome.v1.customers.setIngestAliases({ customer_id: a.data.id, ingest_aliases: ['x'] }),
    );
    expect(err).toBeInstanceOf(ConflictError);
    expect(emu.customers().find((c) => c.id === a.data.id)?.ingest_aliases).toEqual(['y', 'z']);
    const tooLong = await apiError(() =>
      metronome.v1.customers.setIngestAliases({ customer_id: a.data.id, ingest_aliases: ['a'.repeat(129)] }),
    );
    expect(tooLong.status).toBe(400);
  });
});

describe('usage for a customer_id nobody has', () => {
  it('is accepted, kept as unmatched and counted nowhere', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('u-1', 'org-unknown', start, 4)] });
    expect(emu.unmatched().map((e) => [e.transaction_id, e.customer_id, e.matched_customer_id])).toEqual([
      ['u-1', 'org-unknown', null],
    ]);
    expect(emu.totals()).toEqual([
      expect.objectContaining({ customer_id: 'org-unknown', matched: false, count: 1, sums: { value: 4 } }),
    ]);
    const rows = await metronome.v1.usage.list({
      starting_on: new Date(TEN).toISOString(),
      ending_before: new Date(TEN + HOUR).toISOString(),
      window_size: 'HOUR',
    });
    expect(rows.data).toEqual([]);
  });

  it('is attributed to a customer created later with that alias', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('late-1', 'org-late', start, 7)] });
    clock.advance(HOUR);
    const customer = await metronome.v1.customers.create({ name: 'late', ingest_aliases: ['org-late'] });
    expect(emu.unmatched()).toEqual([]);
    const rows = await metronome.v1.usage.list({
      starting_on: new Date(TEN).toISOString(),
      ending_before: new Date(TEN + HOUR).toISOString(),
      window_size: 'HOUR',
      customer_ids: [customer.data.id],
      billable_metrics: [{ id: emu.billableMetrics()[0]!.id }],
    });
    expect(rows.data.map((r) => [r.customer_id, r.value])).toEqual([[customer.data.id, 7]]);
  });

  it('moves with an alias moved to another customer', async ({ emu, metronome }) => {
    const a = await metronome.v1.customers.create({ name: 'a', ingest_aliases: ['site-9'] });
    const b = await metronome.v1.customers.create({ name: 'b' });
    await metronome.v1.usage.ingest({ usage: [reading('m-1', 'site-9', start, 3)] });
    expect(emu.events()[0]?.matched_customer_id).toBe(a.data.id);
    await metronome.v1.customers.setIngestAliases({ customer_id: a.data.id, ingest_aliases: [] });
    await metronome.v1.customers.setIngestAliases({ customer_id: b.data.id, ingest_aliases: ['site-9'] });
    expect(emu.events()[0]?.matched_customer_id).toBe(b.data.id);
    const rows = await metronome.v1.usage.list({
      starting_on: new Date(TEN).toISOString(),
      ending_before: new Date(TEN + HOUR).toISOString(),
      window_size: 'NONE',
      billable_metrics: [{ id: emu.billableMetrics()[0]!.id }],
    });
    expect(rows.data.map((r) => [r.customer_id, r.value])).toEqual([
      [a.data.id, null],
      [b.data.id, 3],
    ]);
  });

  it('is matched by the Metronome customer id as well as by alias', async ({ emu, metronome }) => {
    const c = await metronome.v1.customers.create({ name: 'by-id', ingest_aliases: ['alias-1'] });
    await metronome.v1.usage.ingest({
      usage: [reading('i-1', c.data.id, start, 1), reading('i-2', 'alias-1', start, 2)],
    });
    expect(emu.totals({ customer: c.data.id })).toEqual([
      expect.objectContaining({ customer_id: c.data.id, matched: true, count: 2, sums: { value: 3 } }),
    ]);
  });
});
