// The simulation (scripts/sim) is only as good as its model of the delivery statements: this test runs
// the same random sequences of operations against Postgres (the delivery steps' *-sql.ts, corrections.ts, sweep.ts)
// and against the model (scripts/sim/model.ts), and after every operation compares what each
// answered and every row's state. Identifiers are random in one and counted in the other: they are
// matched by the rows they name.
//
// Why this file is long: the operations' generator, the two stores' drivers and their comparison are one piece.

import type { Kysely } from 'kysely';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { ModelDb, type Row } from '../../scripts/sim/model.js';
import type { DB, MeterEventName } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { claimCorrectionGroup, switchCorrectionToCompensate } from '../../src/metering/corrections-sql.js';
import { ONE_NODE } from '../../src/metering/delivery-sql-shapes.js';
import { holdKeys, releaseHeldKeys } from '../../src/metering/hold-sql.js';
import { releaseLeases, renewLeases } from '../../src/metering/lease-sql.js';
import { reapLeases } from '../../src/metering/reaper-sql.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import type { GroupSettlement } from '../../src/metering/rules/decision.js';
import {
  type ClaimedKey,
  type CorrectionFacts,
  type KeyRef,
  keyName,
  keyRef,
} from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { staleKeys } from '../../src/metering/sweep.js';
import { createOrganization } from '../support/fixtures.js';
import { seededRandom } from '../support/random.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

interface World {
  db: Kysely<DB>;
  model: ModelDb;
  keys: (KeyRef & { organizationId: string })[];
  correctionIds: Map<string, string>;
  /** Postgres identifier → the model's, matched by the rows they name. */
  ids: Map<string, string>;
}

/** Every row of both stores, side by side, identifiers mapped. */
async function compareRows(w: World, step: string) {
  const rows = await w.db
    .selectFrom('meter_outbox')
    .select([
      'id',
      'status',
      'identifier',
      'attempts',
      'accepted_at',
      'correction_action',
      'credit_note_required',
    ])
    .orderBy('id')
    .execute();
  const byId = new Map(w.model.rows.map((r) => [r.id, r]));
  for (const pg of rows) {
    const m = byId.get(pg.id)!;
    if (pg.identifier && m.identifier) {
      const seen = w.ids.get(pg.identifier);
      if (seen === undefined) w.ids.set(pg.identifier, m.identifier);
    }
    expect(
      {
        step,
        id: pg.id,
        status: pg.status,
        identifier: pg.identifier === null ? null : w.ids.get(pg.identifier),
        attempts: pg.attempts,
        accepted: pg.accepted_at !== null,
        action: pg.correction_action,
        creditNote: pg.credit_note_required,
      },
      `row ${pg.id} after ${step}`,
    ).toEqual({
      step,
      id: m.id,
      status: m.status,
      identifier: m.identifier,
      attempts: m.attempts,
      accepted: m.acceptedAt !== null,
      action: m.correctionAction,
      creditNote: m.creditNote,
    });
  }
}

/** A claim's answer without what legitimately differs (identifiers are mapped; waits are timing). */
function shapeOf(w: World, claimed: readonly ClaimedKey[], mapIds: boolean) {
  return [...claimed]
    .sort((a, b) => a.customerId.localeCompare(b.customerId))
    .map((k) =>
      k.state === 'leased'
        ? {
            key: k.customerId,
            state: k.state,
            group: k.group && {
              identifier: mapIds ? w.ids.get(k.group.identifier) : k.group.identifier,
              value: k.group.value,
              rows: k.group.rows,
              attempts: k.group.attempts,
              timestamp: k.group.timestamp.getTime(),
            },
            expired: k.expired,
            corrections: k.corrections,
            moreUsage: k.moreUsage,
            // Whether usage stamped ahead will bring the key back (its time is each one's clock).
            dueLater: k.dueInMs !== undefined,
          }
        : { key: k.customerId, state: k.state },
    );
}

function correctionShape(w: World, facts: CorrectionFacts, mapIds: boolean) {
  return {
    group: facts.group && {
      identifier: mapIds ? w.ids.get(facts.group.identifier) : facts.group.identifier,
      action: facts.group.action,
      original: mapIds ? w.ids.get(facts.group.originalIdentifier) : facts.group.originalIdentifier,
      value: facts.group.value,
      rows: facts.group.rows,
    },
    settled: facts.settled,
    waiting: facts.waitUntil !== null,
    blocked: facts.blocked,
  };
}

async function insertRow(
  w: World,
  key: World['keys'][number],
  r: { kind: 'usage' | 'correction'; value: number; occurredAt: Date; createdAt: Date; corrects?: Row },
) {
  const inserted = await w.db
    .insertInto('meter_outbox')
    .values({
      organization_id: key.organizationId,
      event_name: key.eventName,
      stripe_customer_id: key.customerId,
      value: r.value,
      occurred_at: r.occurredAt,
      created_at: r.createdAt,
      kind: r.kind,
      correction_id: r.kind === 'correction' ? w.correctionIds.get(key.organizationId)! : null,
      corrects_outbox_id: r.corrects?.id ?? null,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  w.model.mirror({
    id: inserted.id,
    organizationId: key.organizationId,
    customerId: key.customerId,
    eventName: key.eventName,
    kind: r.kind,
    value: BigInt(r.value),
    occurredAt: r.occurredAt.getTime(),
    createdAt: r.createdAt.getTime(),
    correctsId: r.corrects?.id ?? null,
  });
}

// Each sequence runs against one of the claim's two forms: one node's (keys without a row are inserted
// leased by the claim) and Citus's (key rows are inserted first, the claim leases existing rows only),
// here on one node with every organization in one group.
const SEQUENCES: [number, 'one node' | 'Citus form'][] = [
  [1, 'one node'],
  [2, 'one node'],
  [3, 'one node'],
  [4, 'one node'],
  [5, 'Citus form'],
  [6, 'Citus form'],
  [7, 'Citus form'],
];

describe('the simulation’s model of the delivery statements', () => {
  it.for(SEQUENCES)(
    'answers every operation of random sequence %i (%s) as Postgres does, and leaves every row as Postgres does',
    async ([run, form], { ctx }) => {
      const placement = form === 'Citus form' ? { distributed: true, router: ONE_NODE } : {};
      const rng = seededRandom(9_000 + run);
      const now = () => Date.now();
      const model = new ModelDb(now, () => rng.next(), {
        retryLimit: 20,
        retryDelaySeconds: 5,
        retryDelayMaxSeconds: 3600,
        expireInSeconds: 300,
      });
      await sql`TRUNCATE meter_outbox, meter_delivery_keys`.execute(ctx.db);
      const keys: World['keys'] = [];
      const correctionIds = new Map<string, string>();
      for (let i = 0; i < 3; i++) {
        const org = await createOrganization(ctx.db);
        const eventName: MeterEventName = 'temperature_readings';
        keys.push({ customerId: org.customerId, eventName, organizationId: org.organizationId });
        const c = await ctx.db
          .insertInto('usage_corrections')
          .values({
            organization_id: org.organizationId,
            range_from: new Date(0),
            range_to: new Date(),
            reason: 'agreement test',
            readings_voided: 0,
            billed_readings_voided: 0,
          })
          .returning('id')
          .executeTakeFirstOrThrow();
        correctionIds.set(org.organizationId, c.id);
      }
      const w: World = { db: ctx.db, model, keys, correctionIds, ids: new Map() };
      const owners = ['a', 'b'];
      const pick = <T>(xs: readonly T[]) => xs[rng.int(xs.length)]!;
      const hourStart = Math.floor(Date.now() / HOUR) * HOUR;
      let lastClaim: { owner: string; claimed: ClaimedKey[] } | undefined;

      for (let step = 0; step < 80; step++) {
        const op = rng.int(100);
        const label = `step ${step}`;
        if (op < 30) {
          // Usage rows: this hour or earlier ones, now and then past Stripe's window, or stamped more
          // than the claim's allowance ahead (waiting for their time).
          const key = pick(keys);
          const age = rng.next() < 0.1 ? 36 * DAY : rng.int(3) * HOUR + rng.int(50) * 60_000;
          const ahead = rng.next() < 0.1;
          for (let n = 1 + rng.int(3); n > 0; n--) {
            await insertRow(w, key, {
              kind: 'usage',
              value: 1 + rng.int(9),
              occurredAt: new Date(
                ahead
                  ? Date.now() + 120_000 + rng.int(120_000)
                  : Math.min(Date.now() - 1000, hourStart + 30 * 60_000 - age + rng.int(600_000)),
              ),
              createdAt: new Date(Date.now() - rng.int(600) * 1000),
            });
          }
        } else if (op < 55) {
          const owner = pick(owners);
          const input = keys.filter(() => rng.next() < 0.7);
          if (input.length === 0) continue;
          if (rng.next() < 0.15) await leasesRunOut(w, pick([5, 45]));
          const options = {
            owner,
            leaseSeconds: 300,
            now: new Date(),
            maxRows: 1 + rng.int(4),
            sendable:
              rng.next() < 0.9 ? (['temperature_readings', 'active_sensors'] as MeterEventName[]) : [],
            // A claiming process whose leases grew leaves a lease that ran out within 30 s to its owner.
            takeOverAfterSeconds: pick([0, 0, 30]),
          };
          const pg = await claimBatch(ctx.db, input, { ...options, ...placement });
          const m = model.claim(input, options);
          await compareRows(w, `${label} claim`);
          expect(shapeOf(w, pg, true), `${label} claim`).toEqual(shapeOf(w, m, false));
          lastClaim = { owner, claimed: pg };
        } else if (op < 75 && lastClaim) {
          // Settle what the last claim leased, with answers drawn at random.
          const leased = lastClaim.claimed.filter(
            (k): k is Extract<ClaimedKey, { state: 'leased' }> => k.state === 'leased',
          );
          const groups: GroupSettlement[] = [];
          for (const k of leased) {
            if (!k.group || rng.next() < 0.2) continue;
            const status = pick(['delivered', 'failed', 'expired', 'accepted', 'pending'] as const);
            groups.push({
              ...keyRef(k),
              identifier: k.group.identifier,
              status,
              error: `e${step}`,
              called: true,
              counted: rng.next() < 0.8,
            });
          }
          const settleKeys = leased.map((k) => ({
            organizationId: k.organizationId,
            customerId: k.customerId,
            eventName: k.eventName,
            called: rng.next() < 0.7,
            ...(rng.next() < 0.3 ? { backoffMs: pick([0, 120_000]) } : {}),
          }));
          const minIntervalMs = pick([0, 120_000]);
          await settleBatch(ctx.db, groups, settleKeys, {
            owner: lastClaim.owner,
            minIntervalMs,
            ...placement,
          });
          model.settle(
            groups.map((g) => ({ ...g, identifier: w.ids.get(g.identifier) ?? g.identifier })),
            settleKeys,
            { owner: lastClaim.owner, minIntervalMs },
          );
          // The two clocks differ by milliseconds: compare what the key rows say (leased, paced,
          // backing off), then give the model Postgres's instants.
          expect(await keyStates(w, true), `${label} settle keys`).toEqual(await keyStates(w, false));
          await syncKeys(w);
          await compareRows(w, `${label} settle`);
          lastClaim = undefined;
        } else if (op < 82) {
          // Void part of a usage row that was sent (a usage correction).
          const candidates = model.rows.filter((r) => r.kind === 'usage' && r.status !== 'expired');
          const original = candidates.length > 0 ? pick(candidates) : undefined;
          if (!original) continue;
          const key = keys.find((k) => k.customerId === original.customerId)!;
          await insertRow(w, key, {
            kind: 'correction',
            value: rng.next() < 0.5 ? Number(original.value) : 1,
            occurredAt: new Date(original.occurredAt),
            createdAt: new Date(),
            corrects: original,
          });
        } else if (op < 90) {
          const key = pick(keys);
          const options = { now: new Date(), validationSeconds: pick([0, 900]) };
          const pg = await claimCorrectionGroup(ctx.db, key, options);
          const m = model.claimCorrections(key, options);
          await compareRows(w, `${label} corrections`);
          expect(correctionShape(w, pg, true), `${label} corrections`).toEqual(correctionShape(w, m, false));
          if (pg.group && rng.next() < 0.3) {
            await switchCorrectionToCompensate(ctx.db, key.organizationId, pg.group.identifier);
            model.switchToCompensate(key, w.ids.get(pg.group.identifier)!);
          }
        } else if (op < 94) {
          const owner = pick(owners);
          const organizationIds = keys.map((k) => k.organizationId);
          const pg = await releaseLeases(ctx.db, owner, {
            nextCallAt: new Date(),
            organizationIds,
            ...placement,
          });
          expect(pg, `${label} release`).toBe(model.release(owner, new Date()));
          expect(await renewLeases(ctx.db, owner, { leaseSeconds: 300, organizationIds, ...placement })).toBe(
            model.renew(owner, 300),
          );
        } else if (op < 96) {
          const key = pick(keys);
          await holdKeys(ctx.db, [key], placement);
          model.hold([key]);
          const pgReleased =
            rng.next() < 0.5 ? await releaseHeldKeys(ctx.db, key.eventName, placement) : null;
          if (pgReleased) {
            const m = model.releaseHeld(key.eventName);
            expect(pgReleased.map((k) => k.customerId).sort()).toEqual(m.map((k) => k.customerId).sort());
          }
        } else if (op < 99) {
          // The operator's redrive of failed rows (all within the identifier window here).
          const pg = await retryFailedRows(ctx.db, ctx.boss);
          const m = model.redrive(() => Number.POSITIVE_INFINITY);
          expect(pg.rows, `${label} redrive`).toBe(m.rows);
          await compareRows(w, `${label} redrive`);
        } else {
          // A lease runs out: 5 s ago (within a slack of 30 s) or 45 s ago (past it); then a reaper
          // with or without that slack.
          if (rng.next() < 0.7) await leasesRunOut(w, pick([5, 45]));
          const slack = pick([0, 30]);
          expect(
            (await reapLeases(ctx.db, { ...placement, takeOverAfterSeconds: slack })).length,
            `${label} reap`,
          ).toBe(model.reap(slack * 1000).length);
          const pg = await staleKeys(ctx.db, { staleSeconds: 120, limit: 1000 });
          const m = model.staleKeys(120_000, 1000);
          expect(pg.keys.map((k) => k.customerId).sort(), `${label} stale keys`).toEqual(
            m.map((k) => k.customerId).sort(),
          );
        }
      }
    },
  );
});

/** Each key row's lease owner and whether it is paced or backing off now, from Postgres or the model. */
async function keyStates(w: World, postgres: boolean) {
  const t = Date.now();
  const rows = postgres
    ? (await w.db.selectFrom('meter_delivery_keys').selectAll().execute()).map((r) => ({
        key: keyName({
          organizationId: r.organization_id,
          customerId: r.stripe_customer_id,
          eventName: r.event_name,
        }),
        owner: r.lease_owner,
        paced: new Date(r.next_call_at).getTime() > t + 60_000,
        backoff: r.retry_at !== null && new Date(r.retry_at).getTime() > t + 60_000,
        hold: r.hold,
      }))
    : [...w.model.keys].map(([key, r]) => ({
        key,
        owner: r.leaseOwner,
        paced: r.nextCallAt.getTime() > t + 60_000,
        backoff: r.retryAt !== null && r.retryAt.getTime() > t + 60_000,
        hold: r.hold,
      }));
  return rows.sort((a, b) => a.key.localeCompare(b.key));
}

/** Every lease held runs out `ago` seconds before now, in Postgres and then in the model. */
async function leasesRunOut(w: World, ago: number) {
  await sql`UPDATE meter_delivery_keys SET lease_expires_at = clock_timestamp() - make_interval(secs => ${ago})
             WHERE lease_owner IS NOT NULL`.execute(w.db);
  await syncKeys(w);
}

/** The key rows' pacing, backoff and leases as Postgres has them (its clock wrote them). */
async function syncKeys(w: World) {
  const rows = await w.db.selectFrom('meter_delivery_keys').selectAll().execute();
  for (const r of rows) {
    const key = {
      organizationId: r.organization_id,
      customerId: r.stripe_customer_id,
      eventName: r.event_name,
    };
    w.model.setKey(key, {
      leaseOwner: r.lease_owner,
      leaseExpiresAt: r.lease_expires_at ? new Date(r.lease_expires_at) : null,
      // '-infinity' (a key never paced) comes back from pg as an invalid date.
      nextCallAt: Number.isNaN(new Date(r.next_call_at).getTime())
        ? new Date(-8.64e15)
        : new Date(r.next_call_at),
      retryAt: r.retry_at ? new Date(r.retry_at) : null,
      hold: r.hold,
    });
  }
}
