// A request with an Idempotency-Key on one node is ONE statement in autocommit (single-node.ts
// storeKeyedAtOnce): its readings, outbox row, new key's job and its stored answer commit together, where
// the transaction path took BEGIN, the group statement, the answer's insert and COMMIT. What the statement
// cannot decide alone it refuses, storing nothing: a live answer for the key (a concurrent request with
// the key committed first); the route then writes the request in a transaction, which replays that
// answer (test/http/readings-idempotency.test.ts runs the route through both).
import { Kysely, PostgresDialect, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { storeKeyedAtOnce } from '../../src/ingest/single-node.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

/** The context's pool behind a Kysely that records every statement it sends. */
function recorder(ctx: Context) {
  const sent: string[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push(event.query.sql.trim()),
  });
  return { db, sent };
}

async function stored(ctx: Context, organizationId: string) {
  const { rows } = await sql<{ readings: number; outbox: number; answers: unknown[] }>`
    SELECT (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ${organizationId}) AS readings,
           (SELECT coalesce(sum(value), 0)::int FROM meter_outbox WHERE organization_id = ${organizationId}) AS outbox,
           (SELECT coalesce(json_agg(json_build_object('key', key, 'hash', request_hash, 'status', response_status,
                                                        'body', response_body) ORDER BY key), '[]')
              FROM idempotency_keys WHERE organization_id = ${organizationId}) AS answers`.execute(ctx.db);
  return rows[0]!;
}

describe('a keyed request as one statement', () => {
  it('stores the readings and the answer in one statement; a live answer for the key refuses the next, storing nothing', async ({
    ctx,
  }) => {
    const now = new Date();
    const org = await createOrganization(ctx.db);
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    const request = {
      organizationId: org.organizationId,
      readings: [reading(s!, 60, 4, now), reading(s!, 120, 4, now)],
    };
    const answer = { key: 'k-1', requestHash: 'h-1', notBefore: new Date(now.getTime() - 3_600_000) };
    const { db, sent } = recorder(ctx);
    const first = await storeKeyedAtOnce(db, request, now, answer);
    expect(first?.outcome).toEqual({ stored: true, result: { inserted: 2, duplicates: 0 } });
    expect(first?.queued).toEqual({ jobs: 1, batchJobs: 0 });
    // One round trip: no BEGIN, no statement of the answer's own, no COMMIT.
    expect(sent).toHaveLength(1);
    expect(sent[0]).toContain('INSERT INTO idempotency_keys');
    expect(await stored(ctx, org.organizationId)).toEqual({
      readings: 2,
      outbox: 2,
      answers: [{ key: 'k-1', hash: 'h-1', status: 201, body: { inserted: 2, duplicates: 0 } }],
    });

    // The same key again, other readings: the live answer stays, and nothing of the request is stored.
    const later = { organizationId: org.organizationId, readings: [reading(s!, 30, 5, now)] };
    expect(await storeKeyedAtOnce(db, later, now, { ...answer, requestHash: 'h-2' })).toBeNull();
    expect(await stored(ctx, org.organizationId)).toEqual({
      readings: 2,
      outbox: 2,
      answers: [{ key: 'k-1', hash: 'h-1', status: 201, body: { inserted: 2, duplicates: 0 } }],
    });

    // Expired (stored before notBefore): replaced, with the counts of this request (its duplicates too).
    const again = {
      organizationId: org.organizationId,
      readings: [...request.readings, reading(s!, 30, 5, now)],
    };
    const replaced = await storeKeyedAtOnce(db, again, now, {
      key: 'k-1',
      requestHash: 'h-3',
      notBefore: new Date(now.getTime() + 1),
    });
    expect(replaced?.outcome).toEqual({ stored: true, result: { inserted: 1, duplicates: 2 } });
    expect(await stored(ctx, org.organizationId)).toEqual({
      readings: 3,
      outbox: 3,
      answers: [{ key: 'k-1', hash: 'h-3', status: 201, body: { inserted: 1, duplicates: 2 } }],
    });
  });

  it('stores no answer for a refused request: nothing of it is stored and the key stays free', async ({
    ctx,
  }) => {
    const now = new Date();
    const org = await createOrganization(ctx.db);
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    const other = await createOrganization(ctx.db);
    const [foreign] = await createSensors(ctx.db, other.organizationId, 1);
    const request = {
      organizationId: org.organizationId,
      readings: [reading(s!, 60, 4, now), reading(foreign!, 60, 4, now)],
    };
    const refused = await storeKeyedAtOnce(ctx.db, request, now, {
      key: 'k-refused',
      requestHash: 'h',
      notBefore: new Date(now.getTime() - 3_600_000),
    });
    expect(refused?.outcome).toEqual({ stored: false, problems: [{ index: 1, message: 'unknown sensor' }] });
    expect(refused?.queued).toEqual({ jobs: 0, batchJobs: 0 });
    expect(await stored(ctx, org.organizationId)).toEqual({ readings: 0, outbox: 0, answers: [] });
  });
});
