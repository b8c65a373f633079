// Ingestion's contract, written once: the cases every writer of a group of requests passes, on one node
// (test/ingest/contract.test.ts: single-node.ts storeGroup) and on a Citus cluster
// (test/citus/ingest-routing.citus.ts: routed.ts storeShardGroup, a transaction per shard group). A case
// sends one group through the group committer, which picks the writer, and reads the answers and the
// ledger: each request answered on its own (inserted and duplicates, or its problems and nothing stored);
// one outbox row per billable organization and destination in force, its value the rows that organization
// inserted, at the ingestion time; each stored reading naming the billing row; one queued delivery job per
// key; the first traceparent of each organization on its row; what was inserted counted into thresholds.
import { randomUUID } from 'node:crypto';
import { type Kysely, type RawBuilder, sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { createThreshold } from '../../src/alerts/threshold-admin.js';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { type GroupCommitOptions, GroupCommitter } from '../../src/ingest/group-commit.js';
import type { GroupRequest, StoreReadingsOutcome } from '../../src/ingest/readings.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';

export interface IngestWriter {
  ctx: Context;
  /** Whether the database is distributed: the committer writes in the Citus shape. */
  distributed: boolean;
  /** The database the committer writes through (default ctx.db): a recording one, to see its statements. */
  db?: Kysely<DB>;
  /** One node: each group first as one statement in autocommit (INGEST_GROUP_ONE_STATEMENT=on). */
  oneStatement?: boolean;
  /** Told how each group was written (GroupCommitOptions.onGroup). */
  onGroup?: GroupCommitOptions['onGroup'];
  /** Told the delivery jobs each committed group statement queued (default: the job table's statistics). */
  jobsQueued?: GroupCommitOptions['jobsQueued'];
  /** The workers' wake-up after a committed group that queued jobs (default: one sent through `db`). */
  wake?: GroupCommitOptions['wake'];
}

/** Writes `requests` as ONE group at `now` (a gate holds the group open until all have joined). */
export async function writeGroup(
  w: IngestWriter,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<StoreReadingsOutcome[]> {
  let joined = 0;
  const committer = new GroupCommitter(
    {
      db: w.db ?? w.ctx.db,
      boss: w.ctx.boss,
      distributed: async () => w.distributed,
      clock: { now: () => now },
    },
    {
      windowMs: 1,
      ...(w.oneStatement ? { oneStatement: true } : {}),
      ...(w.onGroup ? { onGroup: w.onGroup } : {}),
      ...(w.jobsQueued ? { jobsQueued: w.jobsQueued } : {}),
      ...(w.wake ? { wake: w.wake } : {}),
      maxRequests: 1_000,
      maxReadings: 100_000,
      gate: { joined: () => void joined++, mayClose: () => joined >= requests.length },
    },
  );
  return Promise.all(requests.map((r) => committer.submit(r)));
}

/**
 * A group of one reading per organization at `minute`, stored with storeGroup in a transaction on `db`;
 * `reads` (a count the transaction's own statistics give, e.g. pg_stat_get_xact_tuples_*) is read before
 * and after, and its growth returned with the outcomes.
 */
export async function storeGroupCounting(
  db: Kysely<DB>,
  boss: Context['boss'],
  orgs: readonly { organizationId: string; sensor: string }[],
  minute: number,
  reads: RawBuilder<{ n: string }>,
): Promise<{ reads: number; outcomes: StoreReadingsOutcome[] }> {
  const now = new Date();
  return db.transaction().execute(async (trx) => {
    const before = Number((await reads.execute(trx)).rows[0]!.n);
    const outcomes = await storeGroup(
      trx,
      boss,
      orgs.map((o) => ({
        organizationId: o.organizationId,
        readings: [reading(o.sensor, minute, 4.2, now)],
      })),
      now,
    );
    const after = Number((await reads.execute(trx)).rows[0]!.n);
    return { reads: after - before, outcomes };
  });
}

const stored = (inserted: number, duplicates: number): StoreReadingsOutcome => ({
  stored: true,
  result: { inserted, duplicates },
});

/** Registers the contract's cases against the writer `writer()` gives (called in each case). */
export function ingestionContract(writer: () => IngestWriter): void {
  const db = () => writer().ctx.db;
  const org = async (options: Parameters<typeof createOrganization>[1] = {}) => {
    const o = await createOrganization(db(), options);
    return { ...o, sensors: await createSensors(db(), o.organizationId, 2) };
  };
  const outbox = async (organizationId: string) =>
    (
      await sql<{
        id: string;
        destination: string;
        customer: string;
        value: string;
        occurred_at: Date;
        mirrors: string | null;
        traceparent: string | null;
      }>`
        SELECT id::text, destination, stripe_customer_id AS customer, value::text, occurred_at,
               mirrors_outbox_id::text AS mirrors, traceparent
          FROM meter_outbox WHERE organization_id = ${organizationId}
         ORDER BY destination DESC, id`.execute(db())
    ).rows;
  /** The organization's stored readings, by the outbox row they name (null: none). */
  const named = async (organizationId: string) =>
    Object.fromEntries(
      (
        await sql<{ outbox: string | null; n: number }>`
          SELECT outbox_id::text AS outbox, count(*)::int AS n FROM temperature_readings
           WHERE organization_id = ${organizationId} GROUP BY 1`.execute(db())
      ).rows.map((r) => [String(r.outbox), r.n]),
    );
  /** Queued delivery jobs by key (its customer and destination). */
  const jobs = async (organizationId: string) =>
    (
      await sql<{ key: string; n: number }>`
        SELECT concat_ws(' ', data->>'destination', data->>'customerId') AS key, count(*)::int AS n
          FROM pgboss.job
         WHERE name = 'meter-delivery' AND data->>'organizationId' = ${organizationId}
           AND data->>'eventName' = 'temperature_readings'
         GROUP BY 1 ORDER BY 1`.execute(db())
    ).rows;

  describe('ingestion contract', () => {
    it('answers each request of a group on its own, the earlier request winning a reading sent twice', async () => {
      const now = new Date();
      const [a, b, c] = [await org(), await org(), await org()];
      const [a1, a2] = a.sensors as [string, string];
      const [b1] = b.sensors as [string];
      const x = reading(a1, 30, 4.2, now);
      const outcomes = await writeGroup(
        writer(),
        [
          // Within the request: the same reading again (another temperature), and in another zone.
          {
            organizationId: a.organizationId,
            readings: [
              x,
              reading(a2, 30, 1, now),
              { ...x, temperatureC: 9 },
              { ...x, recordedAt: x.recordedAt.replace('Z', '+00:00') },
              reading(a1, 20, 1, now),
            ],
          },
          // The earlier request stored x: a duplicate here.
          {
            organizationId: a.organizationId,
            readings: [{ ...x, temperatureC: 7 }, reading(a2, 10, 1, now)],
          },
          // The same instant written with another offset.
          {
            organizationId: b.organizationId,
            readings: [
              { sensorId: b1, recordedAt: '2026-11-21T09:00:00Z', temperatureC: 5 },
              { sensorId: b1, recordedAt: '2026-11-21T10:00:00+01:00', temperatureC: 6 },
            ],
          },
          { organizationId: c.organizationId, readings: c.sensors.map((s) => reading(s, 5, 1, now)) },
        ],
        now,
      );
      expect(outcomes).toEqual([stored(3, 2), stored(1, 1), stored(1, 1), stored(2, 0)]);
      // The first occurrence is the one kept.
      const kept = await sql<{ t: number }>`
        SELECT temperature_c AS t FROM temperature_readings
         WHERE organization_id = ${a.organizationId} AND sensor_id = ${a1} AND recorded_at = ${x.recordedAt}`.execute(
        db(),
      );
      expect(kept.rows).toEqual([{ t: 4.2 }]);
      // One transaction per organization: one outbox row each, whatever the number of its requests.
      expect((await outbox(a.organizationId)).map((r) => r.value)).toEqual(['4']);
      expect((await outbox(b.organizationId)).map((r) => r.value)).toEqual(['1']);
      expect((await outbox(c.organizationId)).map((r) => r.value)).toEqual(['2']);
    });

    it('refuses a request with an unknown, foreign or inactive sensor whole, and only that request', async () => {
      const now = new Date();
      const [a, b] = [await org(), await org()];
      const [inactive] = await createSensors(db(), a.organizationId, 1, { active: false });
      const [a1, a2] = a.sensors as [string, string];
      const outcomes = await writeGroup(
        writer(),
        [
          {
            organizationId: a.organizationId,
            readings: [reading(a1, 50, 1, now), reading(inactive!, 50, 1, now)],
          },
          // Another organization's sensor reads "unknown", as one that does not exist: never revealed.
          {
            organizationId: a.organizationId,
            readings: [
              reading(b.sensors[0]!, 40, 1, now),
              reading(a1, 40, 1, now),
              reading(randomUUID(), 40, 1, now),
            ],
          },
          { organizationId: a.organizationId, readings: [reading(a2, 30, 1, now)] },
          { organizationId: b.organizationId, readings: [reading(b.sensors[0]!, 30, 1, now)] },
        ],
        now,
      );
      expect(outcomes).toEqual([
        { stored: false, problems: [{ index: 1, message: 'sensor is inactive' }] },
        {
          stored: false,
          problems: [
            { index: 0, message: 'unknown sensor' },
            { index: 2, message: 'unknown sensor' },
          ],
        },
        stored(1, 0),
        stored(1, 0),
      ]);
      // Nothing of the refused requests, not even their good readings; the others billed as usual.
      const rows = await outbox(a.organizationId);
      expect(rows.map((r) => r.value)).toEqual(['1']);
      expect(await named(a.organizationId)).toEqual({ [rows[0]!.id]: 1 });
    });

    it('writes one outbox row per billable organization and destination in force, its value what that organization inserted', async () => {
      const now = new Date();
      const active = await org();
      const trial = await org({ status: 'trial' });
      const canceled = await org({ billable: false });
      const never = await org({ subscription: false });
      const parallel = await org();
      // A parallel run since the last hour boundary but one: Stripe bills, Metronome shadows (its row
      // mirrors Stripe's).
      const hourAgo = new Date(Math.floor(now.getTime() / 3_600_000) * 3_600_000 - 3_600_000);
      await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
                VALUES (${parallel.organizationId}, 'stripe', 'billing', '-infinity'),
                       (${parallel.organizationId}, 'metronome', 'shadow', ${hourAgo})`.execute(db());
      const two = (o: { organizationId: string; sensors: string[] }, secondsAgo: number): GroupRequest => ({
        organizationId: o.organizationId,
        readings: o.sensors.map((s) => reading(s, secondsAgo, 1, now)),
      });
      const outcomes = await writeGroup(
        writer(),
        [
          two(active, 60),
          two(active, 50),
          two(trial, 60),
          two(canceled, 60),
          two(never, 60),
          two(parallel, 60),
        ],
        now,
      );
      expect(outcomes).toEqual(Array(6).fill(stored(2, 0)));

      const [row] = await outbox(active.organizationId);
      expect(await outbox(active.organizationId)).toEqual([
        {
          id: row!.id,
          destination: 'stripe',
          customer: active.customerId,
          value: '4',
          // The usage time is the ingestion's, not the readings' own.
          occurred_at: now,
          mirrors: null,
          traceparent: null,
        },
      ]);
      // Each stored reading names the row that bills it.
      expect(await named(active.organizationId)).toEqual({ [row!.id]: 4 });
      expect((await outbox(trial.organizationId)).map((r) => r.value)).toEqual(['2']);
      // Not billable: stored, named nothing, no row, no job.
      for (const free of [canceled, never]) {
        expect(await outbox(free.organizationId)).toEqual([]);
        expect(await named(free.organizationId)).toEqual({ null: 2 });
        expect(await jobs(free.organizationId)).toEqual([]);
      }
      const [billing, shadow] = await outbox(parallel.organizationId);
      expect([billing, shadow].map((r) => [r?.destination, r?.customer, r?.value, r?.mirrors])).toEqual([
        ['stripe', parallel.customerId, '2', null],
        ['metronome', metronomeAlias(parallel.organizationId), '2', billing!.id],
      ]);
      expect(await named(parallel.organizationId)).toEqual({ [billing!.id]: 2 });
      // The hand-off: one queued delivery job per key.
      expect(await jobs(active.organizationId)).toEqual([{ key: active.customerId, n: 1 }]);
      expect(await jobs(parallel.organizationId)).toEqual([
        { key: parallel.customerId, n: 1 },
        { key: `metronome ${metronomeAlias(parallel.organizationId)}`, n: 1 },
      ]);
    });

    it('bills a re-sent batch only once: duplicates answered, no outbox row for nothing new', async () => {
      const now = new Date();
      const a = await org();
      const [s] = a.sensors as [string];
      const batch = [reading(s, 60, 1, now), reading(s, 50, 1, now)];
      const send = async (readings: typeof batch) =>
        (await writeGroup(writer(), [{ organizationId: a.organizationId, readings }], now))[0];
      expect(await send(batch)).toEqual(stored(2, 0));
      expect(await send(batch)).toEqual(stored(0, 2));
      expect((await outbox(a.organizationId)).map((r) => r.value)).toEqual(['2']);
      // Partly re-sent: only the new reading is billed, and named by the new row.
      expect(await send([batch[0]!, reading(s, 40, 1, now)])).toEqual(stored(1, 1));
      const rows = await outbox(a.organizationId);
      expect(rows.map((r) => r.value)).toEqual(['2', '1']);
      expect(await named(a.organizationId)).toEqual({ [rows[0]!.id]: 2, [rows[1]!.id]: 1 });
      expect(await jobs(a.organizationId)).toEqual([{ key: a.customerId, n: 1 }]);
    });

    it("puts the first traceparent of each organization's requests on its outbox row", async () => {
      const now = new Date();
      const [a, b] = [await org(), await org()];
      const tp = (n: number) => `00-${String(n).padStart(32, '0')}-${'1'.padStart(16, '0')}-01`;
      await writeGroup(
        writer(),
        [
          { organizationId: a.organizationId, readings: [reading(a.sensors[0]!, 9, 1, now)] },
          {
            organizationId: a.organizationId,
            readings: [reading(a.sensors[1]!, 9, 1, now)],
            traceparent: tp(1),
          },
          {
            organizationId: a.organizationId,
            readings: [reading(a.sensors[0]!, 8, 1, now)],
            traceparent: tp(2),
          },
          { organizationId: b.organizationId, readings: [reading(b.sensors[0]!, 9, 1, now)] },
        ],
        now,
      );
      expect((await outbox(a.organizationId)).map((r) => r.traceparent)).toEqual([tp(1)]);
      expect((await outbox(b.organizationId)).map((r) => r.traceparent)).toEqual([null]);
    });

    it('counts what each organization inserted into its thresholds: a crossing fires once', async () => {
      const now = new Date();
      const a = await org();
      for (const quantity of [4, 100]) await createThreshold(db(), a.organizationId, { quantity }, now);
      const [a1, a2] = a.sensors as [string, string];
      const outcomes = await writeGroup(
        writer(),
        [
          { organizationId: a.organizationId, readings: [reading(a1, 30, 1, now), reading(a2, 30, 1, now)] },
          // One duplicate: it counts nothing.
          { organizationId: a.organizationId, readings: [reading(a1, 30, 1, now), reading(a1, 20, 1, now)] },
        ],
        now,
      );
      expect(outcomes).toEqual([stored(2, 0), stored(1, 1)]);
      expect(await crossings(db(), a.organizationId)).toEqual([]);
      await writeGroup(
        writer(),
        [{ organizationId: a.organizationId, readings: [reading(a2, 10, 1, now)] }],
        now,
      );
      expect(await crossings(db(), a.organizationId)).toEqual([[4, 4]]);
    });
  });
}

/** The organization's usage.threshold.crossed events: [quantity, usage]. */
async function crossings(db: Kysely<DB>, organizationId: string) {
  const { rows } = await sql<{ quantity: string; usage: string }>`
    SELECT payload->'data'->'threshold'->>'quantity' AS quantity, payload->'data'->>'usage' AS usage
      FROM alert_events WHERE organization_id = ${organizationId} AND type = 'usage.threshold.crossed'
     ORDER BY seq`.execute(db);
  return rows.map((r) => [Number(r.quantity), Number(r.usage)]);
}
