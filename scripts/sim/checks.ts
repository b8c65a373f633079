// The invariants that are not checked where they happen (destinations.ts checks each call, database.ts
// each settle): every pending row covered by a job, a lease or a named hold within its bound (after
// every step), and at the end, with the world quiet, the ledger: billed = stored − voided per customer
// and destination, nothing billed twice, and a cut-over that billed every reading at the destinations
// in force at its time.

import type { Destination } from '../../src/db/schema.js';
import { keyName } from '../../src/metering/rules/keys.js';
import type { Destinations } from './destinations.js';
import { FUTURE_ALLOWANCE_MS } from './load.js';
import { keyBusyUntil, type Row } from './model.js';
import {
  COVERAGE_BOUND_MS,
  COVERAGE_EVERY_MS,
  COVERAGE_GRACE_MS,
  type Customer,
  type World,
} from './world.js';

/** The coverage invariant, to run after every step (it looks every COVERAGE_EVERY_MS of virtual time). */
export function coverageCheck(world: World): () => void {
  const { db, spec, profile, now, dbNow, violate } = world;
  const uncoveredSince = new Map<string, number>();
  let lastCoverage = 0;
  const coverage = () => {
    // While every live worker is frozen, nothing reaps or sweeps: a key's wait counts from the thaw,
    // and as after a crash it may wait for leases to run out and the reaper.
    const allFrozen = !world.workers.some((w) => w.alive && w.frozenUntil <= now());
    if (allFrozen) world.lastCrash = now();
    const alive = new Set<string>();
    for (const w of world.workers) if (w.alive) alive.add(w.id);
    const covered = new Set<string>();
    /** Keys whose only job is deferred: the earliest such job's time. */
    const deferred = new Map<string, number>();
    /**
     * The last instant (true time) each key surely had a job: a worker fetched it, or it was queued
     * due. Checks run every couple of seconds: a key the sweep queued, a worker fetched and a crash
     * stranded between two checks was covered in between, and its wait counts from then.
     */
    const lastCovered = new Map<string, number>();
    for (const j of db.jobs.values()) {
      const name = keyName(j.key);
      const at = Math.max(
        j.startedAt ?? Number.NEGATIVE_INFINITY,
        j.startAfter <= j.queuedAt + COVERAGE_GRACE_MS ? j.queuedAt : Number.NEGATIVE_INFINITY,
      );
      if (at > (lastCovered.get(name) ?? Number.NEGATIVE_INFINITY)) lastCovered.set(name, at);
      // pg-boss's retry of a failed batch is a disruption's own wait; a created job covers a key only
      // when it is due (a job deferred to the future leaves new readings waiting for it).
      if (j.state === 'retry' || (j.state === 'created' && j.startAfter <= dbNow() + COVERAGE_GRACE_MS))
        covered.add(name);
      else if (j.state === 'created')
        deferred.set(name, Math.min(deferred.get(name) ?? j.startAfter, j.startAfter));
      if (j.state === 'active' && j.worker !== null && alive.has(j.worker)) covered.add(name);
    }
    // A meter-delivery-batch job covers its keys as a key's own job would: queued (due) or retrying,
    // or fetched by a live process for the keys its slices have not yet taken through (a key behind it
    // has its own jobs now). A dead worker's active batch job covers nothing: its keys wait for the
    // sweep (it counts only queued and retrying batch jobs) or, leased, for the reaper.
    /**
     * Keys a dead worker's batch job had not taken through: no lease or job of theirs is left for the
     * reaper, so they wait for the sweep (which counts only queued and retrying batch jobs, sweep.ts),
     * the design's bound for them (COVERAGE_BOUND_MS), not a crash's two leases and a reaper pass.
     */
    const leftToSweep = new Set<string>();
    for (const b of db.batchJobs.values()) {
      if (b.state === 'active' && (b.worker === null || !alive.has(b.worker)))
        for (const k of b.keys.slice(b.through)) leftToSweep.add(keyName(k));
      const at = Math.max(
        b.startedAt ?? Number.NEGATIVE_INFINITY,
        b.startAfter <= b.queuedAt + COVERAGE_GRACE_MS ? b.queuedAt : Number.NEGATIVE_INFINITY,
      );
      const live = b.state === 'active' && b.worker !== null && alive.has(b.worker);
      const covers =
        b.state === 'retry' || (b.state === 'created' && b.startAfter <= dbNow() + COVERAGE_GRACE_MS);
      for (const [i, k] of b.keys.entries()) {
        const name = keyName(k);
        if (at > (lastCovered.get(name) ?? Number.NEGATIVE_INFINITY)) lastCovered.set(name, at);
        if (covers || (live && i >= b.through)) covered.add(name);
        else if (b.state === 'created')
          deferred.set(name, Math.min(deferred.get(name) ?? b.startAfter, b.startAfter));
      }
    }
    /** A deferred job covers a row that must wait anyway: a correction, a group in flight, a key leased, paced or in backoff. */
    const waitsForDeferred = (r: Row, name: string) => {
      const at = deferred.get(name);
      if (at === undefined) return false;
      if (r.kind === 'correction' || r.identifier !== null) return true;
      // A follow-up is queued a statement after the settle that set the key's wait: a slow
      // statement puts it that much later.
      const slack = COVERAGE_GRACE_MS + (profile.slowStatements > 0 ? profile.slowMaxMs : 0);
      return keyBusyUntil(db.keys.get(name)) >= at - slack;
    };
    for (const [name, k] of db.keys) {
      if (k.hold !== null) covered.add(name);
      if (
        k.leaseOwner &&
        k.leaseExpiresAt &&
        k.leaseExpiresAt.getTime() >= dbNow() &&
        // The worker whose lease it is: an owner is `w<n>:<batch>` (a worker's id has no colon).
        alive.has(
          k.leaseOwner.includes(':') ? k.leaseOwner.slice(0, k.leaseOwner.indexOf(':')) : k.leaseOwner,
        )
      )
        covered.add(name);
    }
    const seen = new Set<string>();
    for (const r of db.pendingRows()) {
      if (r.status !== 'pending' || r.acceptedAt !== null) continue;
      if (r.kind === 'correction' && db.rows.find((u) => u.id === r.correctsId)?.status === 'failed')
        continue;
      // Usage stamped ahead of the database's clock waits by design until it is due; then the sweep
      // brings its key back (a due row's wait counts from its due time, within the sweep's bound).
      const dueAt = r.kind === 'usage' && r.identifier === null ? r.occurredAt - FUTURE_ALLOWANCE_MS : 0;
      if (dueAt > dbNow()) continue;
      const name = keyName(r);
      if (covered.has(name) || seen.has(name) || waitsForDeferred(r, name)) continue;
      seen.add(name);
      // (A job's times are the database's clock.)
      const coveredAt = (lastCovered.get(name) ?? Number.NEGATIVE_INFINITY) - profile.dbSkewMs;
      const since = allFrozen ? now() : Math.max(uncoveredSince.get(name) ?? now(), coveredAt);
      uncoveredSince.set(name, since);
      // Only a crash or a failed batch may leave a key to the sweep; otherwise its job or hold is
      // there within moments (a follow-up is queued by the batch that settles it).
      // A crashed worker's leases are as long as its claims made them (lease-length.ts): the longest taken.
      const afterCrash = 2 * Math.max(spec.leaseSeconds * 1000, db.longestLeaseMs) + 15_000;
      const bound =
        dbNow() - dueAt < COVERAGE_BOUND_MS || leftToSweep.has(name)
          ? COVERAGE_BOUND_MS
          : now() - world.lastCrash < afterCrash
            ? afterCrash
            : now() - world.lastDisruption < COVERAGE_BOUND_MS
              ? COVERAGE_BOUND_MS
              : COVERAGE_GRACE_MS;
      if (now() - since > bound)
        violate(
          `pending rows of ${name} covered by no job or hold for ${Math.round((now() - since) / 1000)} s`,
        );
    }
    for (const name of [...uncoveredSince.keys()]) if (!seen.has(name)) uncoveredSince.delete(name);
  };
  return () => {
    if (now() - lastCoverage >= COVERAGE_EVERY_MS) {
      lastCoverage = now();
      coverage();
    }
  };
}

/**
 * The ledger, with the world quiet: billed = stored − voided per customer and destination; nothing
 * billed twice; every row settled but the groups a reconciliation left ambiguous (`leftAmbiguous`).
 */
export function checkLedger(
  world: World,
  destinations: Destinations,
  settled: { leftAmbiguous: ReadonlySet<string>; ambiguous: number },
): void {
  const { db, stripe, metronome, violate } = world;
  const { leftAmbiguous, ambiguous } = settled;
  const { liveAt } = destinations;
  const stuck = db.rows.filter((r) => r.status === 'pending' || r.status === 'failed');
  // Only the groups a reconciliation left ambiguous may stay failed; anything else must have settled.
  const unsettled = stuck.filter((r) => r.identifier === null || !leftAmbiguous.has(r.identifier));
  if (unsettled.length > 0 || (stuck.length > 0 && ambiguous === 0)) {
    violate(
      `${stuck.length} rows never settled: ${(unsettled.length > 0 ? unsettled : stuck).slice(0, 3).map(describe).join('; ')}`,
    );
  }
  for (const id of [...stripe.doubled(), ...metronome.doubled()]) violate(`identifier ${id} billed twice`);
  // Every row of an hourly report is billed once: delivered under an identifier the destination holds
  // (a count of 0 too, which no sum below would miss: a reconciled redrive never takes a 0 as present,
  // rules/reconcile.ts), or left in a group a reconciliation found ambiguous.
  for (const r of db.rows) {
    if (r.eventName !== 'active_sensors' || r.kind !== 'usage' || r.status === 'expired') continue;
    const billed = r.identifier !== null && liveAt(r.destination, r.identifier);
    if (r.status === 'delivered' ? !billed : r.identifier === null || !leftAmbiguous.has(r.identifier))
      violate(
        `report row ${r.id} of ${r.customerId} at ${r.destination} for ${iso(r.occurredAt)} not billed once: ${describe(r)}`,
      );
  }
  // Per customer and destination: what the destination bills is what meterbox delivered there, and is
  // stored − voided for that destination's rows.
  for (const c of world.customers) {
    for (const d of (['temperature_readings', 'active_sensors'] as const).flatMap((eventName) => [
      {
        destination: 'stripe' as const,
        customerId: c.customerId,
        eventName,
        billed: stripe.billed(c.customerId, eventName),
      },
      {
        destination: 'metronome' as const,
        customerId: c.alias,
        eventName,
        billed: metronome.billed(c.alias, eventName),
      },
    ])) {
      const own = db.rows.filter(
        (r) =>
          r.customerId === d.customerId && r.destination === d.destination && r.eventName === d.eventName,
      );
      // A group left failed as ambiguous may be at the destination (that is why it is ambiguous: e.g.
      // two groups of 3 in one minute and the destination counts 3). It is billed once there, and the
      // person who settles it marks it delivered: what the destination holds of those groups (its
      // ground truth, by identifier) counts as delivered — and nothing else does.
      const expected = own
        .filter(
          (r) =>
            r.status === 'delivered' ||
            (r.status === 'failed' &&
              r.identifier !== null &&
              leftAmbiguous.has(r.identifier) &&
              liveAt(d.destination, r.identifier)),
        )
        .reduce((s, r) => s + (r.kind === 'usage' ? r.value : -r.value), 0n);
      if (d.billed !== expected) {
        violate(
          `ledger of ${d.customerId} ${d.eventName} at ${d.destination}: it bills ${d.billed}, delivered rows say ${expected}`,
        );
      }
      const stored = own
        .filter((r) => r.kind === 'usage' && r.status !== 'expired')
        .reduce((s, r) => s + r.value, 0n);
      const voidedTotal = own
        .filter((r) => r.kind === 'correction' && r.status !== 'expired')
        .reduce((s, r) => s + r.value, 0n);
      if (stuck.length === 0 && d.billed !== stored - voidedTotal) {
        violate(
          `ledger of ${d.customerId} ${d.eventName} at ${d.destination}: billed ${d.billed} != stored ${stored} − voided ${voidedTotal}`,
        );
      }
    }
    if (c.mode === 'cutover' || c.mode === 'parallel-cutover') checkCutover(world, c);
    if (c.mode === 'period') checkPeriodCutover(world, c);
  }
}

const HOUR_MS = 3_600_000;
const iso = (t: number) => new Date(t).toISOString();

/**
 * A period-boundary migration, from the Stripe model's subscription and what each destination billed:
 * the cut-over is the end of the first billing period that starts at or after the shadow's start (the
 * hour boundary at or before it); every reading is delivered to the destinations in force at its time
 * (Stripe before the cut-over, Metronome from the shadow's start) and **invoiced** by exactly one:
 * Stripe, or Metronome while its customer is billable — never both (the shadow is unbillable), never
 * neither.
 */
function checkPeriodCutover(world: World, c: Customer) {
  const p = c.period;
  if (!p) return;
  const { stripe, metronome, violate } = world;
  let whole = stripe.periodAt(c.customerId, p.shadowFrom);
  if (whole.start < p.shadowFrom) whole = stripe.periodAt(c.customerId, whole.end);
  const cut = Math.floor(whole.end / HOUR_MS) * HOUR_MS;
  if (c.cutoverAt !== cut)
    violate(
      `period migration of ${c.customerId}: cut-over at ${iso(c.cutoverAt)}, not at the end of the first period shadowed whole (${iso(whole.start)} → ${iso(whole.end)}, shadow from ${iso(p.shadowFrom)})`,
    );
  const billedAt = new Map<number, Set<Destination>>();
  const seen = new Set<number>();
  const expired = new Set<number>();
  for (const r of world.db.rows) {
    if (r.organizationId !== c.organizationId || r.kind !== 'usage') continue;
    const reading = world.mirrors.get(r.id);
    if (reading === undefined) continue;
    if (r.status === 'expired') expired.add(reading);
    seen.add(reading);
    if (r.status !== 'delivered') continue;
    const at = billedAt.get(reading) ?? new Set<Destination>();
    at.add(r.destination);
    billedAt.set(reading, at);
  }
  for (const reading of seen) {
    if (expired.has(reading)) continue;
    const t = world.readingTimes.get(reading)!;
    const want: Destination[] =
      t < p.shadowFrom ? ['stripe'] : t < c.cutoverAt ? ['metronome', 'stripe'] : ['metronome'];
    const at = billedAt.get(reading) ?? new Set<Destination>();
    const got = [...at].sort();
    const where = `reading ${reading} of ${c.customerId} at ${iso(t)} (shadow from ${iso(p.shadowFrom)}, period cut-over ${iso(c.cutoverAt)})`;
    if (got.join() !== want.join())
      violate(`${where} billed by ${got.join(' and ') || 'neither destination'}, not ${want.join(' and ')}`);
    const invoiced = [
      ...(at.has('stripe') ? ['stripe'] : []),
      ...(at.has('metronome') && metronome.billableAt(c.alias, t) ? ['metronome'] : []),
    ];
    if (got.length > 0 && invoiced.length !== 1)
      violate(`${where} invoiced by ${invoiced.length === 0 ? 'neither' : 'both'} Stripe and Metronome`);
  }
}

/**
 * A cut-over, from what each destination billed (not from how ingestion routed): every reading
 * that was billed at all is billed by the destinations in force at its time — before the boundary
 * Stripe (and Metronome too in a parallel run), from it Metronome alone; never by both across a
 * cut-over, never by neither.
 */
function checkCutover(world: World, c: Customer) {
  const billedAt = new Map<number, Set<Destination>>();
  const seenReadings = new Set<number>();
  for (const r of world.db.rows) {
    if (r.organizationId !== c.organizationId || r.kind !== 'usage') continue;
    const reading = world.mirrors.get(r.id);
    if (reading === undefined || r.status === 'expired') continue;
    seenReadings.add(reading);
    if (r.status !== 'delivered') continue;
    const at = billedAt.get(reading) ?? new Set<Destination>();
    at.add(r.destination);
    billedAt.set(reading, at);
  }
  for (const reading of seenReadings) {
    const occurredAt = world.readingTimes.get(reading)!;
    const before = occurredAt < c.cutoverAt;
    const want: Destination[] =
      c.mode === 'parallel-cutover' && before ? ['stripe', 'metronome'] : [before ? 'stripe' : 'metronome'];
    const got = [...(billedAt.get(reading) ?? [])].sort();
    if (got.join() !== want.sort().join())
      world.violate(
        `reading ${reading} of ${c.customerId} at ${new Date(occurredAt).toISOString()} (cut-over ${new Date(c.cutoverAt).toISOString()}) billed by ${got.join(' and ') || 'neither destination'}, not ${want.join(' and ')}`,
      );
  }
}

function describe(r: Row): string {
  return `row ${r.id} ${r.kind} ${r.customerId} value ${r.value} ${r.status} id=${r.identifier ?? '-'} attempts ${r.attempts} ${r.lastError ?? ''}`;
}
