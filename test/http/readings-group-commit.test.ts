// Group commit: concurrent POST /v1/readings requests of one process share one transaction; a failing
// group answers 503 to exactly its requests and stores none; a request that breaks the statement fails
// alone. What a group stores and answers (each request its own answer) is ingestion's contract,
// test/ingest/contract.ts.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { type GroupCommitOptions, GroupCommitter } from '../../src/ingest/group-commit.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { ingestGroupGate } from '../support/gates.js';
import { contextTest, type TestApp } from '../support/test.js';

const cleanups: string[] = [];

// Whether concurrent requests land in one group depends on when each reaches the committer, which a
// loaded machine decides (a full suite on two cores split a group at a 50 ms window). The gate holds
// a test's group open, past the production window, until all of its requests are in.
const gate = ingestGroupGate();
const it = contextTest({ app: { ingestGroupGate: gate } });

it.afterEach(async ({ ctx }) => {
  gate.expect(0);
  for (const statement of cleanups.splice(0)) await sql.raw(statement).execute(ctx.db);
});

function post(app: TestApp, apiKey: string, readings: unknown[], headers: Record<string, string> = {}) {
  return app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey, headers),
    body: JSON.stringify({ readings }),
  });
}

let clock = Date.now() - 3_600_000;
function reading(sensorId: string, temperatureC = 4) {
  clock += 1000;
  return { sensorId, recordedAt: new Date(clock).toISOString(), temperatureC };
}

/**
 * A BEFORE INSERT trigger on temperature_readings running `body` (plpgsql) for rows matching `when`,
 * with a sequence of the same name for bodies that count their calls; dropped after the test.
 */
async function injectOnInsert(ctx: Context, name: string, when: string, body: string): Promise<void> {
  await sql
    .raw(`
      CREATE SEQUENCE ${name};
      CREATE FUNCTION ${name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN ${body} RETURN NEW; END $$;
      CREATE TRIGGER ${name} BEFORE INSERT ON temperature_readings FOR EACH ROW
        WHEN (${when}) EXECUTE FUNCTION ${name}();`)
    .execute(ctx.db);
  cleanups.push(
    `DROP TRIGGER ${name} ON temperature_readings; DROP FUNCTION ${name}(); DROP SEQUENCE ${name};`,
  );
}

async function stored(ctx: Context, org: OrganizationFixture) {
  const { rows } = await sql<{ readings: number; outbox: number; value: number; transactions: number }>`
    SELECT (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ${org.organizationId}) AS readings,
           (SELECT count(*)::int FROM meter_outbox WHERE organization_id = ${org.organizationId}) AS outbox,
           (SELECT coalesce(sum(value), 0)::int FROM meter_outbox WHERE organization_id = ${org.organizationId}) AS value,
           (SELECT count(DISTINCT ingested_at)::int FROM temperature_readings
             WHERE organization_id = ${org.organizationId}) AS transactions`.execute(ctx.db);
  return rows[0]!;
}

/** A committer writing straight to the test database, with a clock of its own. */
function committer(ctx: Context, options: GroupCommitOptions): GroupCommitter {
  let tick = Date.now() - 600_000;
  return new GroupCommitter(
    { db: ctx.db, distributed: ctx.distributed, boss: ctx.boss, clock: { now: () => new Date(tick++) } },
    options,
  );
}

/**
 * What `outcome` settled to, or 'still waiting for its window' if it has not after `ms`: a deadline
 * far beyond one insert on a loaded machine and far below the committer's window, not a speed.
 */
function settledWithin<T>(outcome: Promise<T>, ms: number): Promise<T | 'still waiting for its window'> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'still waiting for its window'>((resolve) => {
    timer = setTimeout(() => resolve('still waiting for its window'), ms);
  });
  return Promise.race([outcome, deadline]).finally(() => clearTimeout(timer));
}

describe('group commit', () => {
  it('answers 503 with Retry-After to exactly the requests of a group the database could not write, storing none', async ({
    ctx,
    app,
  }) => {
    const a = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, a.organizationId, 1);
    await injectOnInsert(
      ctx,
      'fail_group',
      `NEW.organization_id = '${a.organizationId}'`,
      `RAISE EXCEPTION 'injected deadlock' USING ERRCODE = '40P01';`,
    );
    gate.expect(5);
    const results = await Promise.all(
      Array.from({ length: 5 }, () => post(app, a.apiKey, [reading(sensor!)])),
    );
    expect(results.map((r) => r.status)).toEqual([503, 503, 503, 503, 503]);
    for (const r of results) expect(r.headers.get('retry-after')).toMatch(/^\d+$/);
    expect(await stored(ctx, a)).toEqual({ readings: 0, outbox: 0, value: 0, transactions: 0 });
  });

  it('runs a group again when Postgres rolled it back as a deadlock victim: every request stored, none 503', async ({
    ctx,
    app,
  }) => {
    const a = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, a.organizationId, 1);
    // The first attempt is the victim (a sequence is not rolled back with it); the second goes through.
    await injectOnInsert(
      ctx,
      'deadlock_once',
      `NEW.organization_id = '${a.organizationId}'`,
      `IF nextval('deadlock_once') = 1 THEN RAISE EXCEPTION 'injected deadlock' USING ERRCODE = '40P01'; END IF;`,
    );
    gate.expect(5);
    const results = await Promise.all(
      Array.from({ length: 5 }, () => post(app, a.apiKey, [reading(sensor!)])),
    );
    expect(results.map((r) => r.status)).toEqual([201, 201, 201, 201, 201]);
    expect(await stored(ctx, a)).toEqual({ readings: 5, outbox: 1, value: 5, transactions: 1 });
    // One victim attempt (1 row) and one whole group (5 rows).
    const { rows } = await sql<{ last: string }>`SELECT last_value::text AS last FROM deadlock_once`.execute(
      ctx.db,
    );
    expect(Number(rows[0]?.last)).toBe(6);
  });

  it('lets a request that breaks the statement fail alone: the rest of its group is stored', async ({
    ctx,
    app,
  }) => {
    const a = await createOrganization(ctx.db);
    const b = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const [sb] = await createSensors(ctx.db, b.organizationId, 1);
    await injectOnInsert(ctx, 'fail_one', 'NEW.temperature_c = 55.5', `RAISE EXCEPTION 'injected failure';`);
    gate.expect(3);
    const [bad, good, other] = await Promise.all([
      post(app, a.apiKey, [reading(sa!, 55.5)]),
      post(app, a.apiKey, [reading(sa!)]),
      post(app, b.apiKey, [reading(sb!), reading(sb!)]),
    ]);
    expect(bad!.status).toBe(500);
    expect(((await bad!.json()) as { error: { message: string } }).error.message).not.toMatch(/injected/);
    expect(await good!.json()).toEqual({ inserted: 1, duplicates: 0 });
    expect(await other!.json()).toEqual({ inserted: 2, duplicates: 0 });
    expect((await stored(ctx, a)).readings).toBe(1);
    expect((await stored(ctx, b)).readings).toBe(2);
  });

  it('keeps Idempotency-Key replay and conflict among grouped requests', async ({ ctx, app }) => {
    const a = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, a.organizationId, 1);
    const keyed = [reading(sensor!)];
    const other = [reading(sensor!)];
    const [first, second, plain] = await Promise.all([
      post(app, a.apiKey, keyed, { 'idempotency-key': 'k-1' }),
      post(app, a.apiKey, keyed, { 'idempotency-key': 'k-1' }),
      post(app, a.apiKey, [reading(sensor!)]),
    ]);
    expect(plain!.status).toBe(201);
    const answers = [await first!.json(), await second!.json()];
    expect(answers).toEqual([
      { inserted: 1, duplicates: 0 },
      { inserted: 1, duplicates: 0 },
    ]);
    expect([first!.headers.get('idempotent-replayed'), second!.headers.get('idempotent-replayed')]).toContain(
      'true',
    );
    const conflict = await post(app, a.apiKey, other, { 'idempotency-key': 'k-1' });
    expect(conflict.status).toBe(409);
    expect((await stored(ctx, a)).readings).toBe(2);
  });

  it('many concurrent requests: readings and outbox totals equal what their answers said', async ({
    ctx,
    app,
  }) => {
    const orgs = await Promise.all(Array.from({ length: 4 }, () => createOrganization(ctx.db)));
    const sensors = await Promise.all(orgs.map((o) => createSensors(ctx.db, o.organizationId, 3)));
    const requests = Array.from({ length: 120 }, (_, i) => {
      const o = i % orgs.length;
      const own = sensors[o]!;
      // Every third request re-sends an earlier reading of its organization (below): some duplicates.
      return { org: orgs[o]!, readings: [reading(own[i % 3]!), reading(own[(i + 1) % 3]!)] };
    });
    for (let i = 4; i < requests.length; i += 3) requests[i]!.readings[1] = requests[i - 4]!.readings[0]!;
    // Groups close at INGEST_GROUP_MAX_REQUESTS (100) or once every request is in.
    gate.expect(requests.length);
    const answers = await Promise.all(
      requests.map(
        async (r) =>
          (await (await post(app, r.org.apiKey, r.readings)).json()) as {
            inserted: number;
            duplicates: number;
          },
      ),
    );
    for (const [i, org] of orgs.entries()) {
      const said = answers.filter((_, j) => j % orgs.length === i).reduce((n, a) => n + a.inserted, 0);
      const s = await stored(ctx, org);
      expect(s.readings).toBe(said);
      expect(s.value).toBe(said);
      // Grouped: far fewer transactions (and outbox rows) than requests.
      expect(s.outbox).toBeLessThan(30);
    }
    expect(answers.every((a) => a.inserted + a.duplicates === 2)).toBe(true);
  });

  it('with every group slot busy, requests arriving meanwhile wait and are written together as the next group', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [slow, fast] = await createSensors(ctx.db, org.organizationId, 2);
    // The first group's insert takes 300 ms, holding the only slot.
    await injectOnInsert(ctx, 'slow_group', `NEW.sensor_id = '${slow}'`, 'PERFORM pg_sleep(0.3);');
    let tick = Date.now() - 600_000;
    const groups = new GroupCommitter(
      { db: ctx.db, distributed: ctx.distributed, boss: ctx.boss, clock: { now: () => new Date(tick++) } },
      { windowMs: 0, maxRequests: 100, maxReadings: 5000, maxInFlight: 1 },
    );
    const submit = (sensorId: string) =>
      groups.submit({
        organizationId: org.organizationId,
        readings: [{ ...reading(sensorId), recordedAt: new Date(clock).toISOString() }],
      });
    const first = submit(slow!);
    // Give the first group time to start its transaction before the others arrive.
    await new Promise((resolve) => setTimeout(resolve, 100));
    // 20 ms apart: without the cap each would go alone once its 0 ms window ran out.
    const pending: ReturnType<typeof submit>[] = [];
    for (let i = 0; i < 5; i++) {
      pending.push(submit(fast!));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const rest = await Promise.all(pending);
    expect(await first).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    for (const outcome of rest)
      expect(outcome).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    // Two transactions (one ingested_at each): the slow request's, then the five together.
    expect(await stored(ctx, org)).toMatchObject({ readings: 6, outbox: 2, value: 6, transactions: 2 });
  });
  it('writes a request the process handles alone at once, not after the window', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // A ten-minute window: a committer that made the lone request wait for it answers nothing here.
    const groups = committer(ctx, {
      flush: 'adaptive',
      windowMs: 600_000,
      maxRequests: 100,
      maxReadings: 5000,
      maxInFlight: 4,
    });
    const ended = groups.started();
    const outcome = groups.submit({ organizationId: org.organizationId, readings: [reading(sensor!)] });
    expect(await settledWithin(outcome, 20_000)).toEqual({
      stored: true,
      result: { inserted: 1, duplicates: 0 },
    });
    ended();
    expect(await stored(ctx, org)).toMatchObject({ readings: 1, outbox: 1, transactions: 1 });
  });

  it('with the configured limits, writes a batch of 500 at once as a group of its own, not after the window with another', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // The process's own limits (INGEST_GROUP_MAX_REQUESTS, _MAX_READINGS, _MAX_IN_FLIGHT) and a ten-minute
    // window: a committer that let a batch wait for others answers nothing here.
    const groups = committer(ctx, {
      windowMs: 600_000,
      maxRequests: ctx.config.INGEST_GROUP_MAX_REQUESTS,
      maxReadings: ctx.config.INGEST_GROUP_MAX_READINGS,
      maxInFlight: ctx.config.INGEST_GROUP_MAX_IN_FLIGHT,
    });
    const batch = () => Array.from({ length: 500 }, () => reading(sensor!));
    // Two batches in the same turn of the event loop: each is a group, written beside the other.
    const outcomes = [batch(), batch()].map((readings) =>
      groups.submit({ organizationId: org.organizationId, readings }),
    );
    for (const outcome of outcomes)
      expect(await settledWithin(outcome, 20_000)).toEqual({
        stored: true,
        result: { inserted: 500, duplicates: 0 },
      });
    // Two transactions (one ingested_at each), one outbox row each.
    expect(await stored(ctx, org)).toMatchObject({ readings: 1000, outbox: 2, value: 1000, transactions: 2 });
  });

  it('keeps a request waiting while another is on its way: they are written together', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // Two requests a group: the second's arrival closes it, so no timer decides anything here.
    const groups = committer(ctx, {
      flush: 'adaptive',
      windowMs: 600_000,
      maxRequests: 2,
      maxReadings: 5000,
      maxInFlight: 4,
    });
    const ends = [groups.started(), groups.started()];
    const submit = () => groups.submit({ organizationId: org.organizationId, readings: [reading(sensor!)] });
    const first = submit();
    // Turns of the event loop pass (a sole request is written after one): the second is still on its way.
    for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
    const second = submit();
    for (const outcome of await Promise.all([first, second]))
      expect(outcome).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    for (const end of ends) end();
    // One transaction (one ingested_at) for both.
    expect(await stored(ctx, org)).toMatchObject({ readings: 2, outbox: 1, value: 2, transactions: 1 });
  });

  it('after a group of several, keeps a request that is briefly alone for the window: it joins the next', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const groups = committer(ctx, {
      flush: 'adaptive',
      windowMs: 600_000,
      maxRequests: 2,
      maxReadings: 5000,
      maxInFlight: 4,
    });
    const submit = () => groups.submit({ organizationId: org.organizationId, readings: [reading(sensor!)] });
    // Under load: a group of two (full, so no timer decides it).
    const ends = [groups.started(), groups.started()];
    await Promise.all([submit(), submit()]);
    for (const end of ends.splice(0)) end();
    // One request alone between groups; turns of the event loop pass before the next arrives.
    ends.push(groups.started());
    const alone = submit();
    for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
    ends.push(groups.started());
    const next = submit();
    for (const outcome of await Promise.all([alone, next]))
      expect(outcome).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    for (const end of ends) end();
    // Two transactions of two: the lone request waited and went with the next.
    expect(await stored(ctx, org)).toMatchObject({ readings: 4, outbox: 2, value: 4, transactions: 2 });
  });
});
