// A request alone in its group, of LONE_MIN_READINGS readings or more (a batch), is written by its own
// statement (group-statement.ts loneHead), leaner than the group's. The rule: for any one request, the two statements answer alike and leave the same rows (the
// readings and their temperatures, the outbox rows and what names them, the queued jobs, the threshold
// counters and crossings), or refuse alike. Drawn requests mix every case a request can be: own active,
// inactive, foreign and unknown sensors; readings sent twice in the request or already stored; billable,
// trial, not billable and two-destination organizations; keys with and without a queued job; a threshold
// about to be crossed. Each is written by both statements in a transaction rolled back after, so both
// see the same database; in autocommit's form (storeGroupAtOnce) and in the transaction's (storeGroup).
import { randomUUID } from 'node:crypto';
import { type Kysely, sql, type Transaction } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createThreshold } from '../../src/alerts/threshold-admin.js';
import type { Context } from '../../src/context.js';
import { sqlState } from '../../src/db/errors.js';
import type { DB } from '../../src/db/schema.js';
import { LONE_MIN_READINGS, type StatementShape } from '../../src/ingest/group-statement.js';
import { REGROUP_STATE } from '../../src/ingest/queued-in-statement.js';
import type { GroupRequest } from '../../src/ingest/readings.js';
import { storeGroup, storeGroupAtOnce } from '../../src/ingest/single-node.js';
import { openTestContext, recordingDb } from '../support/database.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { seededRandom } from '../support/random.js';

interface Org {
  organizationId: string;
  active: string[];
  inactive: string;
}

let ctx: Context;
let close: () => Promise<void>;
const orgs: Org[] = [];
const now = new Date();
/** The instants a drawn reading takes (few, so readings repeat within a request and against stored ones). */
const SECONDS_AGO = [10, 20, 30, 40];

beforeAll(async () => {
  ({ ctx, close } = await openTestContext());
  await ctx.boss.start();
  const kinds: Parameters<typeof createOrganization>[1][] = [
    {},
    {},
    { status: 'trial' },
    { billable: false },
    { subscription: false },
    {},
  ];
  for (const options of kinds) {
    const o = await createOrganization(ctx.db, options);
    const active = await createSensors(ctx.db, o.organizationId, 3);
    const [inactive] = await createSensors(ctx.db, o.organizationId, 1, { active: false });
    orgs.push({ organizationId: o.organizationId, active, inactive: inactive! });
  }
  // The last one bills Stripe and shadows on Metronome (its rows at Metronome mirror Stripe's).
  await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
            VALUES (${orgs[5]!.organizationId}, 'stripe', 'billing', '-infinity'),
                   (${orgs[5]!.organizationId}, 'metronome', 'shadow', '-infinity')`.execute(ctx.db);
  // The first one has a threshold a few readings away, so some drawn requests cross it.
  await createThreshold(ctx.db, orgs[0]!.organizationId, { quantity: 3 }, now);
  // Stored before: one reading of the first and second organizations (its key's job queued), so drawn
  // readings can be duplicates; the others' keys have no job yet.
  for (const o of orgs.slice(0, 2))
    await storeGroupAtOnce(
      ctx.db,
      [{ organizationId: o.organizationId, readings: [reading(o.active[0]!, 30, 1, now)] }],
      now,
    );
});

afterAll(async () => {
  await close?.();
});

/** A request drawn from `rng`: mostly the organization's active sensors, sometimes any other kind. */
function drawRequest(rng: ReturnType<typeof seededRandom>): GroupRequest {
  const org = orgs[rng.int(orgs.length)]!;
  const other = orgs.find((o) => o !== org)!;
  const readings = Array.from({ length: 1 + rng.int(6) }, () => {
    const roll = rng.int(20);
    const sensor =
      roll === 0
        ? org.inactive
        : roll === 1
          ? other.active[0]!
          : roll === 2
            ? randomUUID()
            : org.active[rng.int(org.active.length)]!;
    return reading(
      sensor,
      SECONDS_AGO[rng.int(SECONDS_AGO.length)]!,
      Math.round(rng.between(-5, 30) * 10) / 10,
      now,
    );
  });
  return { organizationId: org.organizationId, readings };
}

/** What a statement left: its answer (or its refusal) and every row it wrote, ids normalized away. */
async function written(
  trx: Transaction<DB>,
  request: GroupRequest,
  shape: StatementShape,
  form: 'one statement' | 'transaction',
) {
  let answer: unknown;
  try {
    answer =
      form === 'one statement'
        ? (await storeGroupAtOnce(trx, [request], now, shape)).outcomes
        : await storeGroup(trx, ctx.boss, [request], now, shape);
  } catch (err) {
    if (sqlState(err) !== REGROUP_STATE) throw err;
    return { refused: 'regroup' };
  }
  return { answer, ...(await rows(trx, request.organizationId)) };
}

async function rows(db: Kysely<DB>, organizationId: string) {
  const readings = await sql<{ sensor: string; at: Date; t: number; billed_by: string | null }>`
    SELECT r.sensor_id::text AS sensor, r.recorded_at AS at, r.temperature_c AS t,
           (SELECT o.destination || ' ' || o.value FROM meter_outbox o WHERE o.id = r.outbox_id) AS billed_by
      FROM temperature_readings r WHERE r.organization_id = ${organizationId}
     ORDER BY 1, 2`.execute(db);
  const outbox = await sql<{ destination: string; customer: string; value: string; mirrors: string | null }>`
    SELECT o.destination, o.stripe_customer_id AS customer, o.value::text, o.occurred_at,
           (SELECT m.destination FROM meter_outbox m WHERE m.id = o.mirrors_outbox_id) AS mirrors
      FROM meter_outbox o WHERE o.organization_id = ${organizationId}
     ORDER BY o.destination, o.value`.execute(db);
  const jobs = await sql<{ key: string; state: string }>`
    SELECT singleton_key AS key, state::text FROM pgboss.job
     WHERE name = 'meter-delivery' AND data->>'organizationId' = ${organizationId} ORDER BY 1, 2`.execute(db);
  const thresholds = await sql<{ usage: string; state: string }>`
    SELECT coalesce(period_usage, 0)::text AS usage, state FROM alert_thresholds
     WHERE organization_id = ${organizationId} ORDER BY quantity`.execute(db);
  const events = await sql<{ type: string }>`
    SELECT type FROM alert_events WHERE organization_id = ${organizationId} ORDER BY seq`.execute(db);
  return {
    readings: readings.rows,
    outbox: outbox.rows,
    jobs: jobs.rows,
    thresholds: thresholds.rows,
    events: events.rows,
  };
}

/** `write` in a transaction (on `db`) that is rolled back after: what it returned, the database as before. */
async function rolledBack<T>(
  write: (trx: Transaction<DB>) => Promise<T>,
  db: Kysely<DB> = ctx.db,
): Promise<T> {
  const rollback = new Error('rolled back');
  let out: T | undefined;
  await db
    .transaction()
    .execute(async (trx) => {
      out = await write(trx);
      throw rollback;
    })
    .catch((err: unknown) => {
      if (err !== rollback) throw err;
    });
  return out as T;
}

describe("a request alone: its own statement against the group's", () => {
  for (const form of ['one statement', 'transaction'] as const) {
    it(`answers and writes as the group's statement does, for any request (${form})`, async () => {
      const rng = seededRandom();
      const kinds = new Set<string>();
      // 200 draws: a threshold crossing (the refusal) comes about once in 15, and 60 draws missed it
      // for 1.5% of seeds (counted by simulating the draws).
      for (let i = 0; i < 200; i++) {
        const request = drawRequest(rng);
        const lone = await rolledBack((trx) => written(trx, request, 'lone', form));
        const group = await rolledBack((trx) => written(trx, request, 'group', form));
        expect(lone, `seed ${rng.seed}, request ${i}: ${JSON.stringify(request)}`).toEqual(group);
        kinds.add(
          'refused' in lone
            ? 'regrouped'
            : JSON.stringify(lone.answer).includes('problems')
              ? 'problems'
              : 'stored',
        );
      }
      // The draws reached the cases the rule is about (a seed that did not would prove less).
      expect([...kinds].sort()).toEqual(
        form === 'one statement' ? ['problems', 'regrouped', 'stored'] : ['problems', 'stored'],
      );
    });
  }
});

describe('which statement a group gets', () => {
  /** Whether the statement that wrote `requests` (in a rolled-back transaction) was the lone one. */
  const lone = async (requests: GroupRequest[]) => {
    const recording = recordingDb(ctx.pool);
    await rolledBack((trx) => storeGroupAtOnce(trx, requests, now), recording.db);
    const statement = recording.statements.find((text) => text.includes('INSERT INTO temperature_readings'));
    expect(statement).toBeDefined();
    return statement!.includes('WITH p AS');
  };
  const readings = (o: Org, n: number) =>
    Array.from({ length: n }, (_, i) => reading(o.active[i % 3]!, i + 1, 1, now));

  it("writes a request alone of LONE_MIN_READINGS or more with the lone statement, anything else with the group's", async () => {
    // Organizations without thresholds: nothing here crosses one (which would refuse the statement).
    const [, a, b] = orgs as [Org, Org, Org];
    expect(await lone([{ organizationId: a.organizationId, readings: readings(a, 500) }])).toBe(true);
    expect(await lone([{ organizationId: a.organizationId, readings: readings(a, LONE_MIN_READINGS) }])).toBe(
      true,
    );
    expect(
      await lone([{ organizationId: a.organizationId, readings: readings(a, LONE_MIN_READINGS - 1) }]),
    ).toBe(false);
    expect(await lone([{ organizationId: a.organizationId, readings: readings(a, 1) }])).toBe(false);
    // Two requests, however many readings: the group's.
    expect(
      await lone([
        { organizationId: a.organizationId, readings: readings(a, 300) },
        { organizationId: b.organizationId, readings: readings(b, 200) },
      ]),
    ).toBe(false);
  });
});
