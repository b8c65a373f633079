// With INGEST_GROUP_ONE_STATEMENT=on, a group on one node is ONE statement in autocommit
// (single-node.ts storeGroupAtOnce): the readings, their outbox rows, the lock of the keys' queued jobs
// and the new keys' delivery jobs commit together, in one round trip. The jobs are pg-boss's own
// insert's (queued-in-statement.ts): a job queued this way is the job pg-boss's insert() queues, and
// pg-boss fetches it. A group one statement cannot finish (a new key's job refused by a concurrent
// transaction's) stores nothing that way and is written again in a transaction, which locks the other
// job. (A threshold crossed takes the same way: the contract's case "a crossing fires once", run with
// the setting on in test/ingest/contract.test.ts.)
import { Kysely, PostgresDialect, sql } from 'kysely';
import { notifyChannelSql } from 'pg-boss/dist/plans.js';
import { expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { deliveryWake } from '../../src/ingest/delivery-wake.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { enqueueDeliveries } from '../../src/metering/outbox.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import { writeGroup } from './contract.js';

/** The context's pool behind a Kysely that records every statement it sends, and whether it failed. */
function recorder(ctx: Context) {
  const sent: { sql: string; failed: boolean }[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push({ sql: event.query.sql.trim(), failed: event.level === 'error' }),
  });
  return { db, sent };
}

const it = contextTest();

async function jobRows(ctx: Context, keys: readonly string[]) {
  const { rows } = await sql<Record<string, unknown>>`
    SELECT * FROM pgboss.job WHERE name = 'meter-delivery' AND singleton_key = ANY(${[...keys]}::text[])
     ORDER BY singleton_key COLLATE "C"`.execute(ctx.db);
  return rows;
}

it("writes a group as one statement, its new keys' jobs queued as pg-boss queues them", async ({ ctx }) => {
  const now = new Date();
  const a = await createOrganization(ctx.db);
  const b = await createOrganization(ctx.db);
  const [sa] = await createSensors(ctx.db, a.organizationId, 1);
  const [sb] = await createSensors(ctx.db, b.organizationId, 1);
  // b also shadows on Metronome: a key of another destination, whose payload names it.
  const hourAgo = new Date(Math.floor(now.getTime() / 3_600_000) * 3_600_000 - 3_600_000);
  await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
            VALUES (${b.organizationId}, 'stripe', 'billing', '-infinity'),
                   (${b.organizationId}, 'metronome', 'shadow', ${hourAgo})`.execute(ctx.db);
  const keyA = `temperature_readings:${a.customerId}`;
  const keyB = `temperature_readings:${b.customerId}`;
  const keyM = `metronome:temperature_readings:${metronomeAlias(b.organizationId)}`;

  const listener = await ctx.pool.connect();
  const wakeUps: string[] = [];
  listener.on('notification', (n) => wakeUps.push(n.payload ?? ''));
  const channel = (await listener.query<{ c: string }>(`SELECT ${notifyChannelSql('pgboss')} AS c`)).rows[0]!
    .c;
  await listener.query(`LISTEN "${channel}"`);
  try {
    const { db, sent } = recorder(ctx);
    const wake = deliveryWake(db);
    const written: string[] = [];
    const outcomes = await writeGroup(
      { ctx, distributed: false, db, oneStatement: true, onGroup: (w) => void written.push(w), wake },
      [
        { organizationId: a.organizationId, readings: [reading(sa!, 30, 1, now)] },
        { organizationId: b.organizationId, readings: [reading(sb!, 30, 1, now)] },
      ],
      now,
    );
    expect(outcomes).toEqual([
      { stored: true, result: { inserted: 1, duplicates: 0 } },
      { stored: true, result: { inserted: 1, duplicates: 0 } },
    ]);
    // One round trip: no BEGIN, no pg-boss statement of its own, no COMMIT; the workers' wake-up is a
    // statement of its own after the commit (delivery-wake.ts), which no request waits for. Its NOTIFY
    // reaches the listener at its commit, which can be before its own result reaches this process (they
    // come on different connections): waiting for the NOTIFY alone, a wake-up whose result came 300 ms
    // late left the recorder with the group's statement only (the likely cause of a loaded rehearsal's
    // one failure). So the wake-up is awaited first, then its NOTIFY.
    await wake.settled();
    await waitFor("the queue's wake-up", () => wakeUps.includes('meter-delivery') || undefined);
    expect(sent.map((s) => s.failed)).toEqual([false, false]);
    expect(written).toEqual(['one_statement']);
    expect(sent[0]!.sql).toContain('INSERT INTO pgboss.job');
    expect(sent[0]!.sql).not.toContain('pg_notify');
    expect(sent[1]!.sql).toContain('pg_notify');
  } finally {
    await listener.query(`UNLISTEN "${channel}"`);
    listener.release();
  }

  // The same keys' jobs as pg-boss's insert() queues them (enqueueDeliveries), for comparison.
  const ours = await jobRows(ctx, [keyA, keyB, keyM]);
  expect(ours.map((j) => [j.singleton_key, j.group_id, j.data, j.state])).toEqual(
    [
      [
        keyM,
        keyM,
        {
          organizationId: b.organizationId,
          customerId: metronomeAlias(b.organizationId),
          eventName: 'temperature_readings',
          destination: 'metronome',
        },
        'created',
      ],
      [
        keyA,
        keyA,
        { organizationId: a.organizationId, customerId: a.customerId, eventName: 'temperature_readings' },
        'created',
      ],
      [
        keyB,
        keyB,
        { organizationId: b.organizationId, customerId: b.customerId, eventName: 'temperature_readings' },
        'created',
      ],
    ].sort(([x], [y]) => ((x as string) < (y as string) ? -1 : 1)),
  );
  await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery' AND singleton_key = ANY(${[keyA, keyB, keyM]}::text[])`.execute(
    ctx.db,
  );
  await ctx.db.transaction().execute((trx) =>
    enqueueDeliveries(trx, ctx.boss, [
      { organizationId: a.organizationId, customerId: a.customerId, eventName: 'temperature_readings' },
      { organizationId: b.organizationId, customerId: b.customerId, eventName: 'temperature_readings' },
      {
        organizationId: b.organizationId,
        customerId: metronomeAlias(b.organizationId),
        eventName: 'temperature_readings',
        destination: 'metronome',
      },
    ]),
  );
  const theirs = await jobRows(ctx, [keyA, keyB, keyM]);
  // Every column but the job's id and its instants (each insert's own clock).
  const columns = (j: Record<string, unknown>) => {
    const { id: _id, created_on: _c, start_after: _s, keep_until: _k, ...rest } = j;
    return rest;
  };
  expect(ours.map(columns)).toEqual(theirs.map(columns));
  expect(Object.keys(columns(ours[0]!)).length).toBeGreaterThan(15);
  // Both give the jobs time-ordered ids (src/metering/job-ids.ts), not pg-boss's random ones: version 7,
  // carrying the time of the insert (the statement's, by the database's clock; the process's).
  for (const j of [...ours, ...theirs]) {
    const id = String(j.id);
    expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    const carried = Number.parseInt(id.replace('-', '').slice(0, 12), 16);
    expect(Math.abs(carried - (j.created_on as Date).getTime())).toBeLessThan(60_000);
  }

  // pg-boss fetches a job queued by the statement as its own.
  await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
  const { db } = recorder(ctx);
  await writeGroup(
    { ctx, distributed: false, db, oneStatement: true },
    [{ organizationId: a.organizationId, readings: [reading(sa!, 20, 1, now)] }],
    now,
  );
  const fetched = await ctx.boss.fetch('meter-delivery', { batchSize: 10 });
  expect(fetched.map((j) => j.data)).toEqual([
    { organizationId: a.organizationId, customerId: a.customerId, eventName: 'temperature_readings' },
  ]);
});

it("writes the group again in a transaction when a concurrent transaction queued a new key's job first", async ({
  ctx,
}) => {
  const now = new Date();
  const a = await createOrganization(ctx.db);
  const [sa] = await createSensors(ctx.db, a.organizationId, 1);
  const key = `temperature_readings:${a.customerId}`;
  // Another transaction queues the key's job and holds its commit until the group waits for it.
  let commit!: () => void;
  const held = new Promise<void>((resolve) => (commit = resolve));
  const other = ctx.db.transaction().execute(async (trx) => {
    await enqueueDeliveries(trx, ctx.boss, [
      { organizationId: a.organizationId, customerId: a.customerId, eventName: 'temperature_readings' },
    ]);
    await held;
  });
  await waitFor(
    'the other transaction to queue the job',
    async () =>
      ((await jobRows(ctx, [key])).length === 0 &&
        (
          await sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_stat_activity
          WHERE state = 'idle in transaction' AND datname = current_database()`.execute(ctx.db)
        ).rows[0]!.n > 0) ||
      undefined,
  );
  const { db, sent } = recorder(ctx);
  const written: string[] = [];
  const group = writeGroup(
    { ctx, distributed: false, db, oneStatement: true, onGroup: (w) => void written.push(w) },
    [{ organizationId: a.organizationId, readings: [reading(sa!, 30, 1, now)] }],
    now,
  );
  // The group's insert of the key's job waits for the other transaction's uncommitted one.
  const waiting = async () =>
    (
      await sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE wait_event_type = 'Lock' AND query LIKE '/* meterbox:prepared */%'
          AND datname = current_database()`.execute(ctx.db)
    ).rows[0]!.n > 0;
  try {
    await waitFor("the group's insert to wait", async () => (await waiting()) || undefined, 10_000);
  } finally {
    commit();
  }
  await other;
  expect(await group).toEqual([{ stored: true, result: { inserted: 1, duplicates: 0 } }]);
  // The one statement refused to commit without the key's job; the transaction locked the other's job.
  expect(sent[0]!.failed).toBe(true);
  expect(written, 'the metric says the group was written again').toEqual(['regrouped']);
  expect(sent.slice(1).map((s) => s.sql.toLowerCase().split(/\s/)[0])).toEqual(
    expect.arrayContaining(['begin', 'commit']),
  );
  expect((await jobRows(ctx, [key])).map((j) => j.state)).toEqual(['created']);
  const { rows } = await sql<{ n: number }>`SELECT count(*)::int AS n FROM meter_outbox
    WHERE organization_id = ${a.organizationId}`.execute(ctx.db);
  expect(rows[0]!.n).toBe(1);
});

// A correction (src/admin/corrections.ts) locks its sensors FOR UPDATE, voids their readings, then queues
// the key's delivery job in the same transaction. A group statement that had queued that key's new job
// before waiting for the sensors (a foreign-key check waits at the statement's end) held the job the
// correction's insert then waited for: a deadlock, and one of the two rolled back (a slow-suite run of
// the destinations ledger lost a correction that way). The group takes its sensors' key-share locks
// first, so it waits for the correction before it writes anything.
it("waits for a correction's lock of its sensors before it queues the key's job, so the correction's own job never waits for it", async ({
  ctx,
}) => {
  const now = new Date();
  const a = await createOrganization(ctx.db);
  const [sa] = await createSensors(ctx.db, a.organizationId, 1);
  const key = `temperature_readings:${a.customerId}`;
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let locked!: () => void;
  const sensorLocked = new Promise<void>((resolve) => (locked = resolve));
  // The correction's shape: the sensor locked, then (once the group waits) the key's job queued, with a
  // lock timeout far below the deadlock check's second, so a wait for the group's job shows as an error.
  const correction = ctx.db.transaction().execute(async (trx) => {
    await sql`SELECT id FROM sensors WHERE id = ${sa!} FOR UPDATE`.execute(trx);
    locked();
    await released;
    await sql`SET LOCAL lock_timeout = '300ms'`.execute(trx);
    await enqueueDeliveries(trx, ctx.boss, [
      { organizationId: a.organizationId, customerId: a.customerId, eventName: 'temperature_readings' },
    ]);
  });
  await sensorLocked;
  const group = writeGroup(
    { ctx, distributed: false, oneStatement: true },
    [{ organizationId: a.organizationId, readings: [reading(sa!, 30, 1, now)] }],
    now,
  );
  try {
    await waitFor(
      'the group to wait for the sensor',
      async () =>
        (
          await sql<{ n: number }>`SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE wait_event_type = 'Lock' AND query LIKE '/* meterbox:prepared */%'
              AND datname = current_database()`.execute(ctx.db)
        ).rows[0]!.n > 0 || undefined,
      10_000,
    );
  } finally {
    release();
  }
  await expect(correction, "the correction's job did not wait for the group").resolves.toBeUndefined();
  expect(await group).toEqual([{ stored: true, result: { inserted: 1, duplicates: 0 } }]);
  expect((await jobRows(ctx, [key])).map((j) => j.state)).toEqual(['created']);
});
