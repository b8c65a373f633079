// Idempotency-Key under concurrency, as the rules say, whatever the order (the rules' check, run on one
// node by test/http/readings-idempotency-race.test.ts and on the cluster by
// test/citus/keyed-race.citus.ts): clients retry keyed requests while the first is still in flight,
// reuse a key with another body, send a foreign sensor, mixed with unkeyed requests, in waves the group
// commit gathers as it may (keyed requests share groups: single-node.ts, routed.ts). After every wave,
// for each key: every 201 carries the one stored answer, exactly one of them wrote (the others
// replayed), a body other than the stored one got 409 (or 422 when it could not be stored and nothing
// was), and the readings and outbox totals are what the writing answers said. The draws come from the
// run's seed (a failure prints it).
import { createHash } from 'node:crypto';
import { sql } from 'kysely';
import { expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { authHeaders, createOrganization, createSensors, type OrganizationFixture } from './fixtures.js';
import { seededRandom } from './random.js';
import type { TestApp } from './test.js';

interface Sent {
  org: number;
  key: string | undefined;
  body: string;
  status: number;
  replayed: boolean;
  answer: unknown;
}

const hashOf = (body: string) => createHash('sha256').update(body).digest('hex');

async function send(
  app: TestApp,
  org: OrganizationFixture,
  orgIndex: number,
  key: string | undefined,
  body: string,
) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(org.apiKey, key === undefined ? {} : { 'idempotency-key': key }),
    body,
  });
  return {
    org: orgIndex,
    key,
    body,
    status: res.status,
    replayed: res.headers.get('idempotent-replayed') === 'true',
    answer: await res.json(),
  } satisfies Sent;
}

async function totals(ctx: Context, organizationId: string) {
  const { rows } = await sql<{ readings: number; billed: number }>`
    SELECT (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ${organizationId}) AS readings,
           (SELECT coalesce(sum(value), 0)::int FROM meter_outbox WHERE organization_id = ${organizationId}) AS billed`.execute(
    ctx.db,
  );
  return rows[0]!;
}

/** Six waves of keyed and unkeyed requests through `app`, the rules checked after each (see the file's head). */
export async function raceKeyedRequests(ctx: Context, app: TestApp): Promise<void> {
  const random = seededRandom();
  // One after the other: concurrent organizations' reference-table writes deadlock on a cluster.
  const orgs: OrganizationFixture[] = [];
  const sensors: string[][] = [];
  for (let i = 0; i < 3; i++) {
    orgs.push(await createOrganization(ctx.db));
    sensors.push(await createSensors(ctx.db, orgs[i]!.organizationId, 3));
  }
  const stranger = await createOrganization(ctx.db);
  const [foreign] = await createSensors(ctx.db, stranger.organizationId, 1);
  const base = Date.now() - 3_600_000;
  // Bodies per organization: a few readings each at instants of a small pool, so bodies overlap (duplicates);
  // one in six names a sensor of another organization (refused whole, 422).
  const bodyOf = (org: number) => {
    const readings = Array.from({ length: 1 + random.int(3) }, () => ({
      sensorId: random.int(6) === 0 ? foreign! : sensors[org]![random.int(3)]!,
      recordedAt: new Date(base + random.int(40) * 1000).toISOString(),
      temperatureC: 4,
    }));
    return JSON.stringify({ readings });
  };
  const sent: Sent[] = [];
  for (let wave = 0; wave < 6; wave++) {
    // Keys of this wave: two per organization, each sent 1-4 times, mostly with its first body.
    const requests: { org: number; key: string | undefined; body: string }[] = [];
    for (let org = 0; org < orgs.length; org++) {
      for (let k = 0; k < 2; k++) {
        const key = `w${wave}-k${k}`;
        const first = bodyOf(org);
        const times = 1 + random.int(4);
        for (let i = 0; i < times; i++)
          requests.push({ org, key, body: random.int(5) === 0 ? bodyOf(org) : first });
      }
      // An earlier wave's key again (a late retry), and unkeyed requests.
      if (wave > 0) {
        const earlier = sent.find((s) => s.org === org && s.key?.startsWith(`w${random.int(wave)}-`));
        if (earlier) requests.push({ org, key: earlier.key, body: earlier.body });
      }
      for (let i = 0; i < 2; i++) requests.push({ org, key: undefined, body: bodyOf(org) });
    }
    const answers = await Promise.all(
      random.shuffled(requests).map((r) => send(app, orgs[r.org]!, r.org, r.key, r.body)),
    );
    sent.push(...answers);

    // Nothing failed: every answer is 201, 409 or 422.
    for (const s of answers) expect([201, 409, 422], JSON.stringify(s)).toContain(s.status);
    const { rows: stored } = await sql<{ org: string; key: string; hash: string; body: unknown }>`
      SELECT organization_id AS org, key, request_hash AS hash, response_body AS body FROM idempotency_keys
       WHERE organization_id = ANY(${orgs.map((o) => o.organizationId)}::uuid[])`.execute(ctx.db);
    const keys = new Map<string, Sent[]>();
    for (const s of sent.filter((x) => x.key !== undefined)) {
      const id = `${s.org} ${s.key}`;
      keys.set(id, [...(keys.get(id) ?? []), s]);
    }
    for (const [id, requestsOfKey] of keys) {
      const [org, key] = id.split(' ');
      const answer = stored.find((r) => r.org === orgs[Number(org)]!.organizationId && r.key === key);
      const created = requestsOfKey.filter((s) => s.status === 201);
      if (!answer) {
        // Never stored: no request with the key was answered 201.
        expect(created, id).toEqual([]);
        continue;
      }
      const hashOfRequest = (s: Sent) => hashOf(`POST /v1/readings\n${s.body}`);
      // Every 201 is the stored answer, for the stored body; exactly one wrote it.
      for (const s of created) {
        expect(s.answer, id).toEqual(answer.body);
        expect(hashOfRequest(s), id).toBe(answer.hash);
      }
      expect(
        created.filter((s) => !s.replayed),
        id,
      ).toHaveLength(1);
      // Another body: 409, or 422 when it could not be stored and met no answer yet.
      for (const s of requestsOfKey.filter((x) => hashOfRequest(x) !== answer.hash))
        expect([409, 422], id).toContain(s.status);
    }
    // What is stored and billed is what the writing answers said.
    for (const [i, o] of orgs.entries()) {
      const wrote = sent
        .filter((s) => s.org === i && s.status === 201 && !s.replayed)
        .reduce((n, s) => n + (s.answer as { inserted: number }).inserted, 0);
      expect(await totals(ctx, o.organizationId), `organization ${i} after wave ${wave}`).toEqual({
        readings: wrote,
        billed: wrote,
      });
    }
  }
  // The run exercised what it claims: replays, conflicts and refusals.
  expect(sent.some((s) => s.replayed)).toBe(true);
  expect(sent.some((s) => s.status === 409)).toBe(true);
  expect(sent.some((s) => s.status === 422)).toBe(true);
}
