// The reconciled redrive (`meterbox outbox retry --reconcile`, `reconcile: true` on the admin routes):
// failed groups past their destination's identifier window are settled against the destination's
// own total before anything is resent. Per customer, meter and window (Stripe: the minute of the
// group's event, the narrowest window its summaries take; Metronome: the UTC hour, the narrowest
// its usage query has), rules/reconcile.ts reconcileWindow finds the one subset of the window's failed groups
// that explains the destination's total beyond what meterbox knows it billed there:
//   present  → the group is marked delivered (nothing is sent);
//   missing  → its identifier is cleared, so the next claim regroups its rows under a new one;
//   ambiguous (no subset, several, a group still in flight, a delivery too recent to be counted,
//   the window changed while it was read) → the group stays failed, reported with the reason.
// A `last` meter (active_sensors) cannot be billed twice by a resend of the same value at the same
// time, so its groups are present when the destination's value is theirs, and resent otherwise; a count
// of 0 always (the value of a window without the event too).
//
// Why this file is long: one operation read in order: the failed groups of a window, each destination's
// totals, the verdict and its settlement.
import type Metronome from '@metronome/sdk';
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { connectedAccountBudget } from '../billing/limits.js';
import { listAccountMeters, METER_SPECS, meterStateOf } from '../billing/stripe-account.js';
import type { Config } from '../config.js';
import type { CorrectionAction, DB, Destination, MeterEventName, OutboxKind } from '../db/schema.js';
import { BUDGET_ROW, createAccountCallers, createBudgetedCaller } from './budget.js';
import { type DestinationTotals, metronomeTotals, NotAskable, stripeTotals } from './destination-totals.js';
import { enqueueDelivery } from './outbox.js';
import { hourOf } from './rules/claim.js';
import { keyRef } from './rules/keys.js';
import { reconcileWindowBlocked, reconcileWindowGroups } from './rules/reconcile.js';
import { destinationCallsPerSecond } from './store.js';

const HOUR_MS = 3_600_000;

export interface ReconciledGroup {
  identifier: string;
  destination: Destination;
  customerId: string;
  eventName: MeterEventName;
  kind: OutboxKind;
  /** Start of the window compared (the minute at Stripe, the hour at Metronome). */
  window: Date;
  reason?: string;
}

export interface ReconciledRedrive {
  /** The destination has them: marked delivered, nothing sent. */
  delivered: ReconciledGroup[];
  /** The destination lacks them: their rows are pending again, to be grouped under a new identifier. */
  reissued: ReconciledGroup[];
  /** Left failed: no single answer (or the destination could not be asked); `reason` says why. */
  ambiguous: ReconciledGroup[];
  /** Calls made to the destinations (each through its call budget). */
  calls: number;
}

export interface ReconcileDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Config;
  stripe: Stripe | undefined;
  metronome: Metronome | undefined;
  distributed?: boolean;
}

/** One group as the destination sees it: the signed value it adds to one window. */
interface Effect {
  identifier: string;
  kind: OutboxKind;
  status: 'pending' | 'delivered' | 'failed' | 'expired';
  /** v2: Stripe accepted it and validates (counted, as far as its summaries go). */
  accepted: boolean;
  /** When the group was last delivered (a delivery too recent may not be aggregated yet). */
  deliveredAt: Date | null;
  timestamp: number;
  value: bigint;
}

interface GroupRow {
  identifier: string;
  kind: OutboxKind;
  status: Effect['status'];
  action: CorrectionAction | null;
  accepted: boolean;
  delivered_at: Date | null;
  timestamp: Date;
  sum: string;
  last: string;
  /** A correction group: the outbox row it corrects (one of its rows'), to find the original's time. */
  corrects: string | null;
  organization_id: string;
}

/**
 * Every group of one key whose rows lie in one UTC hour, with its effect at the destination: usage
 * adds its value at its newest row's time (a `last` meter: that row's value); a compensating
 * correction subtracts at its own time; a cancel takes the original event out, at the original's time.
 */
async function groupsOfHour(
  db: Kysely<DB>,
  key: { destination: Destination; customerId: string; eventName: MeterEventName },
  hour: number,
): Promise<Effect[]> {
  const from = new Date(hour);
  const to = new Date(hour + HOUR_MS);
  const { rows } = await sql<GroupRow>`
    SELECT g.identifier, min(g.kind) AS kind, min(g.status) AS status, min(g.correction_action) AS action,
           bool_or(g.accepted_at IS NOT NULL) AS accepted, max(g.delivered_at) AS delivered_at,
           max(g.occurred_at) AS timestamp, sum(g.value)::text AS sum,
           (array_agg(g.value ORDER BY g.occurred_at DESC, g.id DESC))[1]::text AS last,
           min(g.corrects_outbox_id)::text AS corrects, min(g.organization_id::text) AS organization_id
      FROM meter_outbox g
     WHERE g.destination = ${key.destination} AND g.stripe_customer_id = ${key.customerId}
       AND g.event_name = ${key.eventName} AND g.identifier IS NOT NULL
       AND g.occurred_at >= ${from} AND g.occurred_at < ${to}
     GROUP BY g.identifier`.execute(db);
  // A cancel's effect is at its original event's time: read apart, joined on the organization (on
  // Citus a correlated subquery here was refused: "complex joins are only supported when all
  // distributed tables are co-located and joined on their distribution columns").
  const corrects = rows.filter((r) => r.corrects !== null);
  const originals = new Map<string, Date>();
  if (corrects.length > 0) {
    const { rows: found } = await sql<{ id: string; at: Date }>`
      SELECT u.id::text AS id, max(o.occurred_at) AS at
        FROM meter_outbox u JOIN meter_outbox o
          ON o.organization_id = u.organization_id AND o.identifier = u.identifier AND o.kind = 'usage'
       WHERE u.id = ANY(${corrects.map((r) => r.corrects)}::bigint[])
         AND u.organization_id = ANY(${corrects.map((r) => r.organization_id)}::uuid[])
       GROUP BY u.id`.execute(db);
    for (const f of found) originals.set(f.id, new Date(f.at));
  }
  return rows.map((r) => {
    const cancel = r.kind === 'correction' && r.action === 'cancel';
    const original = r.corrects === null ? undefined : originals.get(r.corrects);
    const at = cancel && original ? original : r.timestamp;
    const value =
      r.kind === 'correction'
        ? -BigInt(r.sum)
        : key.eventName === 'active_sensors'
          ? BigInt(r.last)
          : BigInt(r.sum);
    return {
      identifier: r.identifier,
      kind: r.kind,
      status: r.status,
      accepted: r.accepted,
      deliveredAt: r.delivered_at ? new Date(r.delivered_at) : null,
      timestamp: new Date(at).getTime(),
      value,
    };
  });
}

/** The Stripe meter id of each event name: STRIPE_METER_ID_*, else the catalog the worker wrote, else Stripe's list. */
export async function stripeMeterIds(
  deps: Pick<ReconcileDeps, 'db' | 'config' | 'stripe'>,
): Promise<(eventName: MeterEventName) => string | undefined> {
  const ids = new Map<MeterEventName, string>();
  const configured = {
    temperature_readings: deps.config.STRIPE_METER_ID_TEMPERATURE_READINGS,
    active_sensors: deps.config.STRIPE_METER_ID_ACTIVE_SENSORS,
  } as const;
  const catalog = await deps.db
    .selectFrom('stripe_meter_catalog')
    .select(['event_name', 'meter_id'])
    .where('state', '=', 'active')
    .execute();
  for (const spec of METER_SPECS) {
    const id = configured[spec.eventName] ?? catalog.find((c) => c.event_name === spec.eventName)?.meter_id;
    if (id) ids.set(spec.eventName, id);
  }
  if (ids.size < METER_SPECS.length && deps.stripe) {
    const meters = await listAccountMeters(deps.stripe);
    for (const spec of METER_SPECS) {
      const state = meterStateOf(spec, meters);
      if (!ids.has(spec.eventName) && state.kind === 'ok') ids.set(spec.eventName, state.meter.id);
    }
  }
  return (eventName) => ids.get(eventName);
}

/** The destination readers of a reconciliation, each through its destination's call budget. */
export async function destinationReaders(
  deps: Pick<ReconcileDeps, 'db' | 'config' | 'stripe' | 'metronome' | 'distributed'>,
  meterId?: (eventName: MeterEventName) => string | undefined,
): Promise<Partial<Record<Destination, DestinationTotals>>> {
  const readers: Partial<Record<Destination, DestinationTotals>> = {};
  const callerOf = (destination: Destination) => {
    const rate = destinationCallsPerSecond(deps.config, destination);
    return {
      db: deps.db,
      rate,
      distributed: deps.distributed === true,
      caller: createBudgetedCaller(deps.db, {
        rate,
        budgetRow: BUDGET_ROW[destination],
        share: deps.config.RECONCILIATION_BUDGET_SHARE,
        maxPerSecond: deps.config.RECONCILIATION_MAX_CALLS_PER_SECOND,
        distributed: deps.distributed === true,
      }),
    };
  };
  if (deps.stripe) {
    const platform = callerOf('stripe');
    // Stripe Connect: a connected customer's summaries take its account's own budget row.
    const accounts = createAccountCallers(deps.db, {
      rate: platform.rate,
      connectedRate: connectedAccountBudget(deps.config).callsPerSecond,
      share: deps.config.RECONCILIATION_BUDGET_SHARE,
      maxPerSecond: deps.config.RECONCILIATION_MAX_CALLS_PER_SECOND,
      distributed: deps.distributed === true,
      platform: platform.caller,
    });
    readers.stripe = stripeTotals(deps.stripe, meterId ?? (await stripeMeterIds(deps)), {
      ...platform,
      accounts,
    });
  }
  if (deps.metronome) readers.metronome = metronomeTotals(deps.metronome, callerOf('metronome'));
  return readers;
}

interface Window {
  destination: Destination;
  customerId: string;
  eventName: MeterEventName;
  start: number;
}

const sameGroups = (a: readonly Effect[], b: readonly Effect[]) =>
  a.length === b.length &&
  a.every((x) =>
    b.some((y) => y.identifier === x.identifier && y.status === x.status && y.value === x.value),
  );

/**
 * Settles failed groups past the window (`refused`, as retryFailedRows lists them) against their
 * destinations' totals; see the module comment. Every group of a compared window that is failed is
 * weighed with them (a failed group within the window might have landed too).
 */
export async function reconcileRefused(
  deps: ReconcileDeps,
  refused: readonly {
    identifier: string;
    destination: Destination;
    customerId: string;
    eventName: MeterEventName;
  }[],
  readers?: Partial<Record<Destination, DestinationTotals>>,
): Promise<ReconciledRedrive> {
  const result: ReconciledRedrive = { delivered: [], reissued: [], ambiguous: [], calls: 0 };
  if (refused.length === 0) return result;
  const sources = readers ?? (await destinationReaders(deps));
  const settleMs = deps.config.RECONCILIATION_SETTLE_SECONDS * 1000;

  // The windows holding the refused groups (a group's effect decides its window, not its rows).
  const windows = new Map<string, Window>();
  const hours = new Map<string, Effect[]>();
  for (const g of refused) {
    const reader = sources[g.destination];
    const hourKey = async (hour: number) => {
      const k = `${g.destination}|${g.customerId}|${g.eventName}|${hour}`;
      let effects = hours.get(k);
      if (!effects) {
        effects = await groupsOfHour(deps.db, g, hour);
        hours.set(k, effects);
      }
      return effects;
    };
    // The group's rows all lie in one UTC hour; its effect is in that hour too (a cancel's original
    // is the event whose readings the correction rows carry, hence the same hour).
    const row = await deps.db
      .selectFrom('meter_outbox')
      .select((eb) => eb.fn.max('occurred_at').as('at'))
      .where('identifier', '=', g.identifier)
      .executeTakeFirst();
    const at = row?.at ? new Date(row.at).getTime() : undefined;
    const effect =
      at === undefined
        ? undefined
        : (await hourKey(hourOf(new Date(at)))).find((e) => e.identifier === g.identifier);
    if (!reader || !effect) {
      result.ambiguous.push({
        ...g,
        kind: effect?.kind ?? 'usage',
        window: new Date(at ?? 0),
        reason: reader ? 'the group has no rows left' : `${g.destination} is not configured here`,
      });
      continue;
    }
    const start = Math.floor(effect.timestamp / reader.windowMs) * reader.windowMs;
    windows.set(`${g.destination}|${g.customerId}|${g.eventName}|${start}`, {
      destination: g.destination,
      customerId: g.customerId,
      eventName: g.eventName,
      start,
    });
  }

  for (const w of windows.values()) {
    const reader = sources[w.destination]!;
    const end = w.start + reader.windowMs;
    const inWindow = async () =>
      (await groupsOfHour(deps.db, w, hourOf(new Date(w.start)))).filter(
        (e) => e.timestamp >= w.start && e.timestamp < end,
      );
    const before = await inWindow();
    const unknown = before.filter((e) => e.status === 'failed');
    const entry = (e: Effect, reason?: string): ReconciledGroup => ({
      identifier: e.identifier,
      destination: w.destination,
      customerId: w.customerId,
      eventName: w.eventName,
      kind: e.kind,
      window: new Date(w.start),
      ...(reason ? { reason } : {}),
    });
    const leave = (reason: string) => {
      for (const e of unknown) result.ambiguous.push(entry(e, reason));
    };
    if (unknown.length === 0) continue;
    // Nothing to ask while the window cannot have a verdict anyway (a group in flight, one too recent).
    const blocked = reconcileWindowBlocked(before, new Date(), settleMs);
    if (blocked) {
      leave(blocked);
      continue;
    }
    let counted: number;
    try {
      counted = await reader.window(w.customerId, w.eventName, new Date(w.start));
    } catch (err) {
      leave(
        err instanceof NotAskable
          ? err.message
          : `${w.destination} could not be asked: ${err instanceof Error ? err.message.slice(0, 200) : String(err)}`,
      );
      continue;
    }
    const after = await inWindow();
    if (!sameGroups(before, after)) {
      leave('the window changed while it was compared; redrive again');
      continue;
    }
    const total = BigInt(Math.round(counted));
    const verdict = reconcileWindowGroups({
      groups: before,
      destinationTotal: total,
      eventName: w.eventName,
      now: new Date(),
      settleMs,
    });
    if ('ambiguous' in verdict) {
      leave(verdict.ambiguous.replace('the destination', w.destination));
      continue;
    }
    const present = new Set(verdict.present);
    const missing = new Set(verdict.missing);
    await deps.db.transaction().execute(async (trx) => {
      const reissued = new Set<string>();
      // A customer has pending rows in one organization at a time (its delivery job is named without
      // the organization, as retryFailedRows keeps it): the organization that has the key's pending rows
      // now, else the first group reissued here, holds it; another organization's groups stay failed.
      const pendingIn = await trx
        .selectFrom('meter_outbox')
        .select('organization_id')
        .distinct()
        .where('status', '=', 'pending')
        .where('stripe_customer_id', '=', w.customerId)
        .where('event_name', '=', w.eventName)
        .where('destination', '=', w.destination)
        .orderBy('organization_id')
        .execute();
      let holder = pendingIn[0]?.organization_id;
      for (const e of unknown) {
        if (present.has(e.identifier)) {
          const r = await trx
            .updateTable('meter_outbox')
            .set({
              status: 'delivered',
              // The destination received it when it was sent, not now: the identifier's commit is
              // the closest known instant (a later cancel judges Stripe's 24 h from here).
              delivered_at: sql`coalesce(identified_at, created_at)`,
              last_error: sql`${`reconciled: ${w.destination} counted this group in the window from ${new Date(w.start).toISOString()}; marked delivered, not resent. `} || coalesce(last_error, '')`,
              updated_at: sql`now()`,
            })
            .where('identifier', '=', e.identifier)
            .where('status', '=', 'failed')
            .executeTakeFirst();
          if (Number(r.numUpdatedRows) > 0) result.delivered.push(entry(e));
        } else if (missing.has(e.identifier)) {
          const owner = await trx
            .selectFrom('meter_outbox')
            .select('organization_id')
            .where('identifier', '=', e.identifier)
            .where('status', '=', 'failed')
            .executeTakeFirst();
          if (owner && holder !== undefined && owner.organization_id !== holder) {
            result.ambiguous.push(
              entry(
                e,
                `another organization has this customer's pending ${w.destination} rows: left failed, redrive again once they are delivered`,
              ),
            );
            continue;
          }
          holder ??= owner?.organization_id;
          const r = await trx
            .updateTable('meter_outbox')
            .set({
              status: 'pending',
              identifier: null,
              // identified_at stays: the next group's identifier is derived from it too (identifiers.ts),
              // so these rows get a new one, never the identifier the destination lacks.
              accepted_at: null,
              attempts: 0,
              // A correction's call is decided again at its next claim (a cancel may no longer be allowed).
              correction_action: null,
              last_error: sql`${`reconciled: ${w.destination} lacks identifier ${e.identifier} (window from ${new Date(w.start).toISOString()}); regrouped under a new identifier. `} || coalesce(last_error, '')`,
              updated_at: sql`now()`,
            })
            .where('identifier', '=', e.identifier)
            .where('status', '=', 'failed')
            .returning('organization_id')
            .execute();
          if (r.length > 0) {
            result.reissued.push(entry(e));
            for (const { organization_id } of r) reissued.add(organization_id);
          }
        }
      }
      // The key of each organization whose rows were regrouped (a customer's rows are in one at a time).
      for (const organizationId of [...reissued].sort()) {
        await enqueueDelivery(
          trx,
          deps.boss,
          keyRef({
            organizationId,
            customerId: w.customerId,
            eventName: w.eventName,
            destination: w.destination,
          }),
        );
      }
    });
  }
  result.calls = Object.values(sources).reduce((n, r) => n + r.calls, 0);
  return result;
}
