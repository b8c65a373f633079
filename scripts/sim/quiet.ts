// The world quiets: no more faults, readings or crashes, and the operator redrives until nothing is
// left, groups past the identifier window through the reconciled redrive (redrive-reconcile.ts),
// which weighs them against the destination's own totals.
import type { Destination, MeterEventName } from '../../src/db/schema.js';
import { reconcileWindowGroups, type WindowGroup } from '../../src/metering/rules/reconcile.js';
import { NO_FAULTS } from './stripe-model.js';
import type { Workers } from './workers.js';
import { notifyAll, RECONCILIATION_SETTLE_MS, type World } from './world.js';

/** What the quiet rounds left failed: the groups a reconciliation found ambiguous, and how many rows. */
export interface Settled {
  /**
   * The failed groups the last reconciled redrive left to a person (several subsets of them explain the
   * destination's total, or none does): meterbox cannot tell which of them the destination holds.
   */
  leftAmbiguous: ReadonlySet<string>;
  ambiguous: number;
}

/** Quiets the world and runs it (checked after every step) in rounds of two hours, redriving after each. */
export async function quietDown(world: World, workers: Workers, check: () => void): Promise<Settled> {
  const { sched, db, stripe, metronome, log, violations } = world;
  world.quiet = true;
  stripe.faults = { ...NO_FAULTS };
  metronome.faults = { error500: 0, acceptedThen500: 0, reset: 0, rateLimit: 0 };
  stripe.meters = { temperature_readings: true, active_sensors: true };
  if (world.workers.every((w) => !w.alive)) workers.start();
  log('the world quiets');
  const leftAmbiguous = new Set<string>();
  let ambiguous = 0;
  for (let round = 0; round < 6; round++) {
    await sched.runUntil(sched.now + 2 * 3_600_000, check, () => violations.length >= 5);
    const pending = db.rows.filter((r) => r.status === 'pending');
    const failed = db.rows.filter((r) => r.status === 'failed');
    if (pending.length === 0 && failed.length === 0) break;
    const r = db.redrive(world.windowOf);
    leftAmbiguous.clear();
    // A redriven group has its full retry limit again.
    for (const id of r.resent) world.calls.delete(id);
    // Each batch whose lease the redrive took may call once more, unrecorded (its settle is refused).
    world.counts.takeovers += r.revoked;
    ambiguous = reconcilePastWindow(world, r.refused, leftAmbiguous);
    log(
      `quiet round ${round}: ${pending.length} pending, ${failed.length} failed; redrove ${r.rows}, ${r.refused.length} past the window`,
    );
    notifyAll(world);
  }
  return { leftAmbiguous, ambiguous };
}

/**
 * The reconciled redrive (redrive-reconcile.ts): groups past the identifier window, weighed per
 * destination, customer, meter and window (Stripe: the minute; Metronome: the hour) against the
 * destination's own total, by rules/reconcile.ts reconcileWindowGroups. Returns how many stay failed,
 * and adds the ambiguous ones to `leftAmbiguous`.
 */
function reconcilePastWindow(world: World, refused: readonly string[], leftAmbiguous: Set<string>): number {
  const { db, stripe, metronome, log, dbNow } = world;
  const windowMsOf = (d: Destination) => (d === 'metronome' ? 3_600_000 : 60_000);
  const windows = new Map<
    string,
    { destination: Destination; customerId: string; eventName: MeterEventName; from: number }
  >();
  for (const identifier of refused) {
    const e = db.eventOf(identifier);
    if (!e) continue;
    const size = windowMsOf(e.destination);
    const from = Math.floor(e.timestamp / size) * size;
    windows.set(`${e.destination}|${e.customerId}|${e.eventName}|${from}`, {
      destination: e.destination,
      customerId: e.customerId,
      eventName: e.eventName,
      from,
    });
  }
  let left = 0;
  for (const w of windows.values()) {
    const to = w.from + windowMsOf(w.destination);
    const identifiers = new Set(
      db.rows
        .filter(
          (r) =>
            r.identifier !== null &&
            r.destination === w.destination &&
            r.customerId === w.customerId &&
            r.eventName === w.eventName,
        )
        .map((r) => r.identifier!),
    );
    const groups: WindowGroup[] = [];
    for (const identifier of identifiers) {
      const e = db.eventOf(identifier);
      if (!e || e.timestamp < w.from || e.timestamp >= to) continue;
      const head = db.rows.find((r) => r.identifier === identifier)!;
      groups.push({
        identifier,
        status: head.status,
        accepted: head.acceptedAt !== null,
        deliveredAt: head.deliveredAt === null ? null : new Date(head.deliveredAt),
        value: e.value,
      });
    }
    const verdict = reconcileWindowGroups({
      groups,
      destinationTotal:
        w.destination === 'metronome'
          ? metronome.billed(w.customerId, w.eventName, w.from, to)
          : stripe.billedBetween(w.customerId, w.eventName, w.from, to),
      eventName: w.eventName,
      now: new Date(dbNow()),
      settleMs: RECONCILIATION_SETTLE_MS,
    });
    const failed = groups.filter((g) => g.status === 'failed');
    log(
      `reconcile ${w.destination} ${w.customerId} ${new Date(w.from).toISOString()}: ${'ambiguous' in verdict ? `ambiguous (${verdict.ambiguous})` : `present ${verdict.present.length}, missing ${verdict.missing.length}`}`,
    );
    if ('ambiguous' in verdict) {
      left += failed.length;
      for (const g of failed) leftAmbiguous.add(g.identifier);
      continue;
    }
    for (const id of verdict.present) db.reissue(id, true);
    for (const id of verdict.missing) db.reissue(id, false);
  }
  notifyAll(world);
  return left;
}
