// An organization's destinations over time (issue 34): moving it outright, a parallel run, the
// cut-over (the parity report that proves each destination exact per customer and hour: parity.ts).
//
// organization_destinations holds intervals by usage time on UTC hour boundaries (0024). Every change
// takes effect at an hour boundary at least `leadMs` ahead of now: ingestion decides a row's
// destinations in its own statement from the usage time it stamps, so a boundary minutes ahead cannot
// be crossed by a transaction that read the intervals before the change (a write stamped at or after
// the boundary starts after the change committed, unless it ran for minutes or a clock is that far off).
import { type Kysely, sql, type Transaction } from 'kysely';
import { type PeriodCutOverPlan, planPeriodCutOver, type StripeBillingPeriod } from '../billing/periods.js';
import type { Context } from '../context-type.js';
import type { DB, Destination } from '../db/schema.js';
import { forgetThresholdPeriod } from '../db/threshold-periods.js';
import type { DestinationRole } from '../metering/destinations.js';
import { ensureCustomer, metronomeAlias } from '../metering/metronome.js';

/** Least time between a change and the hour boundary it takes effect at (see the module comment). */
export const DEFAULT_CHANGE_LEAD_MS = 5 * 60_000;

const HOUR_MS = 3_600_000;

/** The first UTC hour boundary at or after now + leadMs. */
export function nextHourBoundary(now: Date, leadMs = DEFAULT_CHANGE_LEAD_MS): Date {
  return new Date(Math.ceil((now.getTime() + leadMs) / HOUR_MS) * HOUR_MS);
}

export interface IntervalView {
  destination: Destination;
  role: DestinationRole;
  from: Date | null;
  until: Date | null;
}

export class DestinationChangeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DestinationChangeError';
  }
}

type Db = Kysely<DB> | Transaction<DB>;

/** The organization's intervals, oldest first; none stored means Stripe, billing, always. */
export async function listIntervals(db: Db, organizationId: string): Promise<IntervalView[]> {
  const rows = await sql<{
    destination: Destination;
    role: DestinationRole;
    from: Date | null;
    until: Date | null;
  }>`SELECT destination, role,
            CASE WHEN valid_from = '-infinity' THEN NULL ELSE valid_from END AS "from", valid_until AS until
       FROM organization_destinations WHERE organization_id = ${organizationId}
      ORDER BY valid_from, destination`.execute(db);
  if (rows.rows.length === 0) return [{ destination: 'stripe', role: 'billing', from: null, until: null }];
  return rows.rows;
}

/** The intervals open at the end (valid_until null): what new usage goes to. */
function openIntervals(intervals: readonly IntervalView[]) {
  return intervals.filter((i) => i.until === null);
}

/**
 * Locks the organization (one change at a time) and makes the implicit Stripe interval of an
 * organization without any explicit, so that it can be closed like any other.
 */
async function lockAndMaterialize(trx: Transaction<DB>, organizationId: string): Promise<IntervalView[]> {
  const org = await sql`SELECT id FROM organizations WHERE id = ${organizationId} FOR UPDATE`.execute(trx);
  if (org.rows.length === 0) throw new DestinationChangeError(`no organization ${organizationId}`);
  const existing =
    await sql`SELECT 1 FROM organization_destinations WHERE organization_id = ${organizationId} LIMIT 1`.execute(
      trx,
    );
  if (existing.rows.length === 0) {
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              VALUES (${organizationId}, 'stripe', 'billing', '-infinity')`.execute(trx);
  }
  return listIntervals(trx, organizationId);
}

/**
 * Ends the open intervals at `at`; one that would only start at or after `at` (a parallel run not begun
 * yet, a change not in force yet) never took effect and is removed.
 */
async function closeOpen(trx: Transaction<DB>, organizationId: string, at: Date) {
  // An interval in force at `at` that a scheduled change (a period-boundary cut-over) ends later is
  // ended at `at` too, and the change's intervals that only start at or after `at` never take effect:
  // from `at` the new change alone decides.
  // The threshold period depends on the intervals (a Metronome organization counts in its own months).
  await forgetThresholdPeriod(trx, organizationId);
  await sql`DELETE FROM organization_destinations
             WHERE organization_id = ${organizationId} AND valid_from >= ${at}
               AND (valid_until IS NULL OR valid_until > ${at})`.execute(trx);
  await sql`UPDATE organization_destinations SET valid_until = ${at}
             WHERE organization_id = ${organizationId} AND (valid_until IS NULL OR valid_until > ${at})`.execute(
    trx,
  );
  // A period-boundary cut-over not reached yet is replaced by this change.
  await sql`DELETE FROM organization_period_migrations
             WHERE organization_id = ${organizationId} AND cut_over_at > ${at}`.execute(trx);
}

async function open(
  trx: Transaction<DB>,
  organizationId: string,
  destination: Destination,
  role: DestinationRole,
  from: Date | 'always',
) {
  await forgetThresholdPeriod(trx, organizationId);
  await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
            VALUES (${organizationId}, ${destination}, ${role},
                    ${from === 'always' ? sql`'-infinity'::timestamptz` : sql`${from}::timestamptz`})`.execute(
    trx,
  );
}

/** A new organization's destination (DEFAULT_DESTINATION): nothing stored for Stripe, the implicit default. */
export async function assignInitialDestination(
  trx: Transaction<DB>,
  organizationId: string,
  destination: Destination,
): Promise<void> {
  if (destination !== 'stripe') await open(trx, organizationId, destination, 'billing', 'always');
}

/**
 * A new organization that also shadows on `destination` from its first reading (the demo organization
 * of `npm start`, so its usage reaches the Metronome emulator at once): only for an organization that
 * has stored nothing yet, since usage stored before an interval is not sent there.
 */
export async function shadowFromTheStart(
  trx: Transaction<DB>,
  organizationId: string,
  destination: Destination,
): Promise<void> {
  const current = openIntervals(await lockAndMaterialize(trx, organizationId));
  if (current.some((i) => i.destination === destination)) return;
  await open(trx, organizationId, destination, 'shadow', 'always');
}

export interface Change {
  /** The hour boundary the change takes effect at (usage time). */
  at: Date;
  intervals: IntervalView[];
  /** Nothing to do: the organization already bills there alone. */
  unchanged?: boolean;
}

/**
 * `meterbox destinations set`: the organization bills `destination` alone from the next hour boundary
 * (any parallel run ends there too).
 */
export async function setDestination(
  db: Kysely<DB>,
  organizationId: string,
  destination: Destination,
  options: { now: Date; leadMs?: number },
): Promise<Change> {
  return db.transaction().execute(async (trx) => {
    const intervals = await lockAndMaterialize(trx, organizationId);
    const current = openIntervals(intervals);
    const at = nextHourBoundary(options.now, options.leadMs);
    if (
      current.length === 1 &&
      current[0]!.destination === destination &&
      current[0]!.role === 'billing' &&
      (current[0]!.from === null || current[0]!.from.getTime() <= at.getTime())
    ) {
      return { at, intervals, unchanged: true };
    }
    await closeOpen(trx, organizationId, at);
    await open(trx, organizationId, destination, 'billing', at);
    return { at, intervals: await listIntervals(trx, organizationId) };
  });
}

/**
 * `meterbox destinations start-parallel --to D`: from the next hour boundary the organization's usage
 * also goes to D, in shadow (the billing destination stays as it is).
 */
export async function startParallel(
  db: Kysely<DB>,
  organizationId: string,
  to: Destination,
  options: { now: Date; leadMs?: number },
): Promise<Change> {
  return db.transaction().execute(async (trx) => {
    const intervals = await lockAndMaterialize(trx, organizationId);
    const current = openIntervals(intervals);
    const at = nextHourBoundary(options.now, options.leadMs);
    if (current.some((i) => i.destination === to)) {
      const same = current.find((i) => i.destination === to)!;
      if (same.role === 'shadow') return { at, intervals, unchanged: true };
      throw new DestinationChangeError(
        `the organization already bills to ${to}${same.from ? ` from ${same.from.toISOString()}` : ''}; a parallel run needs a second destination, one it does not bill to`,
      );
    }
    if (current.some((i) => i.role === 'shadow'))
      throw new DestinationChangeError(
        'a parallel run is already under way; cut over or set a destination first',
      );
    await open(trx, organizationId, to, 'shadow', at);
    return { at, intervals: await listIntervals(trx, organizationId) };
  });
}

/**
 * `meterbox destinations cut-over`: the shadow destination becomes the billing one at the next hour
 * boundary (chosen here and returned): usage before it bills the old destination, usage from it the new
 * one, no usage both or neither.
 */
export async function cutOver(
  db: Kysely<DB>,
  organizationId: string,
  options: { now: Date; leadMs?: number },
): Promise<Change & { from: Destination; to: Destination }> {
  return db.transaction().execute(async (trx) => {
    const intervals = await lockAndMaterialize(trx, organizationId);
    const at = nextHourBoundary(options.now, options.leadMs);
    // What is in force at the boundary: a parallel run with a period-boundary cut-over still ahead
    // (its intervals end later) can be cut over earlier, at this hour boundary.
    const current = intervals.filter(
      (i) =>
        (i.until === null || i.until.getTime() > at.getTime()) &&
        (i.from === null || i.from.getTime() <= at.getTime()),
    );
    const shadow = current.find((i) => i.role === 'shadow');
    const billing = current.find((i) => i.role === 'billing');
    if (!shadow || !billing)
      throw new DestinationChangeError('no parallel run to cut over: start-parallel first');
    await closeOpen(trx, organizationId, at);
    await open(trx, organizationId, shadow.destination, 'billing', at);
    return {
      at,
      from: billing.destination,
      to: shadow.destination,
      intervals: await listIntervals(trx, organizationId),
    };
  });
}

export interface PeriodChange extends Change {
  from: Destination;
  to: Destination;
  plan: PeriodCutOverPlan;
}

/**
 * `meterbox destinations start-parallel --to D --cut-over period-end`: from the next hour boundary the
 * organization's usage also goes to D (shadow), and D becomes the billing destination at the end of
 * the first Stripe billing period the parallel run covers whole (`period`, read from Stripe by the
 * caller), all decided now and stored: the intervals in organization_destinations (ingestion applies
 * them by usage time, on the database clock, as any hour boundary) and the plan in
 * organization_period_migrations. Run again with the same period: unchanged.
 */
export async function startPeriodParallel(
  db: Kysely<DB>,
  organizationId: string,
  to: Destination,
  period: StripeBillingPeriod,
  options: { now: Date; leadMs?: number },
): Promise<PeriodChange> {
  return db.transaction().execute(async (trx) => {
    const intervals = await lockAndMaterialize(trx, organizationId);
    const notBefore = nextHourBoundary(options.now, options.leadMs);
    const stored = await sql<{ cut_over_at: Date; shadow_from: Date; from_destination: Destination }>`
      SELECT cut_over_at, shadow_from, from_destination FROM organization_period_migrations
       WHERE organization_id = ${organizationId} AND to_destination = ${to} AND cut_over_at > ${options.now}
       ORDER BY cut_over_at LIMIT 1`.execute(trx);
    const pending = stored.rows[0];
    if (pending) {
      const plan = planPeriodCutOver(period, pending.shadow_from, pending.shadow_from);
      return {
        at: pending.shadow_from,
        intervals,
        unchanged: true,
        from: pending.from_destination,
        to,
        plan: { ...plan, cutOverAt: pending.cut_over_at },
      };
    }
    const current = openIntervals(intervals);
    const billing = current.filter((i) => i.role === 'billing');
    if (billing.length !== 1 || current.some((i) => i.from && i.from.getTime() > options.now.getTime()))
      throw new DestinationChangeError('a change is scheduled already; set a destination first');
    const from = billing[0]!.destination;
    // The boundary is the Stripe subscription's: the guide this follows moves from Stripe to Metronome.
    if (from !== 'stripe' || to !== 'metronome')
      throw new DestinationChangeError(
        'a period-boundary cut-over moves an organization billed by Stripe to Metronome; use the hour boundary otherwise',
      );
    // A parallel run under way (an hour-boundary start-parallel) keeps its start: a period that began
    // after it is shadowed whole already.
    const shadow = current.find((i) => i.role === 'shadow');
    if (shadow && shadow.destination !== to)
      throw new DestinationChangeError(`a parallel run to ${shadow.destination} is under way`);
    const shadowFrom = shadow ? (shadow.from ?? new Date(0)) : notBefore;
    const plan = planPeriodCutOver(period, shadowFrom, notBefore);
    if (!shadow) await open(trx, organizationId, to, 'shadow', shadowFrom);
    await closeOpen(trx, organizationId, plan.cutOverAt);
    await open(trx, organizationId, to, 'billing', plan.cutOverAt);
    await sql`INSERT INTO organization_period_migrations
                (organization_id, cut_over_at, from_destination, to_destination, stripe_subscription_id,
                 shadow_from, period_start, period_end)
              VALUES (${organizationId}, ${plan.cutOverAt}, ${from}, ${to}, ${period.subscriptionId},
                      ${shadowFrom}, ${plan.periodStart}, ${plan.periodEnd})`.execute(trx);
    return {
      at: shadowFrom,
      from,
      to,
      plan,
      intervals: await listIntervals(trx, organizationId),
    };
  });
}

/** The ingest alias the organization's Metronome usage is sent under (shown by the CLI and the dashboard). */
export const aliasOf = metronomeAlias;

/** Before usage goes to Metronome: the organization's customer with meterbox's alias exists there. */
export async function prepareDestination(
  ctx: Pick<Context, 'db' | 'metronome'>,
  organizationId: string,
  destination: Destination,
): Promise<{ metronomeCustomer?: { id: string; created: boolean } }> {
  if (destination !== 'metronome') return {};
  if (!ctx.metronome)
    throw new DestinationChangeError('METRONOME_BEARER_TOKEN is not set: no organization can use Metronome');
  const org = await sql<{
    name: string;
  }>`SELECT name FROM organizations WHERE id = ${organizationId}`.execute(ctx.db);
  const name = org.rows[0]?.name;
  if (name === undefined) throw new DestinationChangeError(`no organization ${organizationId}`);
  return { metronomeCustomer: await ensureCustomer(ctx.metronome, { id: organizationId, name }) };
}
