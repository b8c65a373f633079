// What happens to a world while it is active: readings arriving (backdated, stamped ahead by an API
// host whose clock is ahead, routed to the destinations of a cut-over), the sweep and Stripe's error
// reports the worker processes handle, and the faults in time: worker kills and restarts, freezes, a
// failover, a Stripe outage, a meter archived for a while, operator corrections and redrives.
import { FUTURE_ALLOWANCE_SECONDS } from '../../src/metering/claim-statement-sql.js';
import type { Database } from './database.js';
import { NO_FAULTS, STRIPE_FUTURE_MS } from './stripe-model.js';
import type { Workers } from './workers.js';
import {
  type Customer,
  crash,
  destinationsAt,
  freeze,
  notifyAll,
  SWEEP_INTERVAL_SECONDS,
  SWEEP_STALE_SECONDS,
  type World,
} from './world.js';

/** Usage stamped further than this past the database's clock waits until it is due (claim-statement-sql.ts). */
export const FUTURE_ALLOWANCE_MS = FUTURE_ALLOWANCE_SECONDS * 1000;

/** Each customer's readings, from a random instant of the first second until the activity ends. */
export function scheduleReadings(world: World): void {
  const { sched, db, rng, hostileRng, profile, mutations, spec, now } = world;
  let readingsOf = 0;
  /**
   * The instant ingestion routes a reading by: its own time. (Mutation: a reading of the last minutes
   * before a cut-over is routed by the API host's clock, minutes ahead of the reading.)
   */
  const routedAt = (occurredAt: number, cutoverAt: number) =>
    mutations.has('wrongDestination') && occurredAt < cutoverAt && occurredAt >= cutoverAt - 5 * 60_000
      ? cutoverAt
      : occurredAt;
  const arrive = (c: Customer) => {
    const t = now();
    if (t >= world.end || world.quiet) return;
    // The database is down (a failover): the sensor keeps its reading and sends it a little later.
    if (world.dbDown) {
      sched.after(1_000, () => arrive(c));
      return;
    }
    const back = rng.next() < spec.backdated;
    let occurredAt = back
      ? t - (rng.next() < 0.3 ? 36 * 86_400_000 : rng.int(30) * 3_600_000)
      : t - rng.int(2000);
    // An API host whose clock is ahead accepts readings stamped up to 5 minutes past its own clock.
    if (profile.apiSkewMs > 0 && !back && hostileRng.next() < 0.2) {
      occurredAt = t + hostileRng.int(profile.apiSkewMs + 5 * 60_000);
      if (occurredAt > t + STRIPE_FUTURE_MS) world.counts.futureReadings++;
    }
    const value = BigInt(1 + rng.int(5));
    // One row per destination the customer bills to at the usage's time (ingestion's rule).
    world.readingTimes.set(readingsOf, occurredAt);
    const to = destinationsAt(c, routedAt(occurredAt, c.cutoverAt));
    for (const d of to) {
      // A reading for both destinations is one transaction with two keys; Metronome's sorts first. When
      // a concurrent transaction's job of it was refused and then fetched by a worker (a race of
      // concurrent requests the model's atomic ingestion has not), the retry pass inserts its job under
      // a hand-off name (outbox.ts handOffName): one such reading in four, by its number (no random draw,
      // so no other stream of the seed moves).
      const handOff =
        to.length > 1 && d.destination === 'metronome' && Math.imul(readingsOf + 1, 0x9e3779b1) >>> 30 === 0;
      const { row, job } = db.ingest(
        {
          organizationId: c.organizationId,
          customerId: d.customerId,
          eventName: 'temperature_readings',
          ...(d.destination === 'stripe' ? {} : { destination: d.destination }),
        },
        value,
        occurredAt,
        handOff,
      );
      if (job && handOff) world.log(`ingest queued ${job.id} ${job.name}`);
      world.mirrors.set(row.id, readingsOf);
    }
    readingsOf++;
    notifyAll(world);
    sched.after(Math.max(1, Math.round(-Math.log(1 - rng.next()) * spec.arrivalSeconds * 1000)), () =>
      arrive(c),
    );
  };
  for (const c of world.customers) sched.after(rng.int(1000), () => arrive(c));
}

/** The sweep (sweep.ts) and pg-boss's supervisor, as the worker processes run them; Stripe's error reports as webhooks. */
export function scheduleUpkeep(world: World, database: Database, workers: Workers): void {
  const { sched, db, stripe, mutations, policy, log, now, dbNow } = world;
  const sweep = () => {
    if (world.workers.some((w) => w.alive) && !world.dbDown) {
      db.promote(policy.validationMs);
      const keys = db.staleKeys(SWEEP_STALE_SECONDS * 1000, 1000);
      for (const k of keys) db.insertJob(k, dbNow());
      if (keys.length > 0) {
        log(`sweep queued ${keys.length} keys`);
        notifyAll(world);
      }
      db.expireJobs();
    }
    sched.after(SWEEP_INTERVAL_SECONDS * 1000, sweep);
  };
  sched.after(SWEEP_INTERVAL_SECONDS * 1000, sweep);
  // Stripe's error reports, as webhooks a minute or so after the event.
  stripe.onReport = (r) =>
    sched.after(r.at - now(), function deliverReport() {
      // Stripe sends a webhook again until it is answered.
      if (world.dbDown) {
        sched.after(5_000, deliverReport);
        return;
      }
      const generation = world.dbGeneration;
      const n = db.failReported(r.identifier, r.code);
      log(`error report ${r.code} for ${r.identifier.slice(-6)}: ${n} rows failed`);
      if (r.code === 'no_meter') workers.refreshCatalog();
      // The webhook is answered 200 only once the standbys have its commit (src/api/webhooks.ts): a
      // primary that dies before that never answers it, and Stripe sends it again (to the promoted
      // standby, which may lack it). Mutation: answered at the commit, so a lost report stays lost.
      const wait = mutations.has('webhookNoStandbyWait') ? 0 : database.standbyWait(true);
      if (wait > 0)
        sched.after(wait, () => {
          if (world.dbGeneration === generation) return;
          log(
            `error report for ${r.identifier.slice(-6)} unanswered (the primary died before its standby had it): Stripe sends it again`,
          );
          sched.after(60_000, deliverReport);
        });
    });
}

/** Faults in time: crashes and restarts, freezes, the failover, an outage, a missing meter, corrections, redrives. */
export function scheduleFaults(world: World, database: Database, workers: Workers): void {
  const { sched, db, rng, hostileRng, profile, spec, stripe, log, dbNow } = world;
  for (let i = 0; i < spec.crashes; i++) {
    // The last crash comes in the load's last seconds: no new reading then re-covers what it left,
    // so only the reaper (leases, fetched jobs) gets its keys going again.
    const at =
      i === spec.crashes - 1 ? spec.minutes * 60_000 - rng.int(3_000) : rng.int(spec.minutes * 60_000);
    sched.after(at, () => {
      const alive = world.workers.filter((w) => w.alive);
      const victim = alive[rng.int(alive.length)];
      if (!victim) return;
      crash(world, victim);
      sched.after(1000 + rng.int(10_000), () => {
        if (!world.quiet || world.workers.every((w) => !w.alive)) workers.start();
      });
    });
  }
  // The profile's freezes: a live worker, at each instant, stops for seconds to minutes.
  for (const f of profile.freezes)
    sched.after(f.atMs, () => {
      const alive = world.workers.filter((w) => w.alive);
      const victim = alive[hostileRng.int(alive.length)];
      if (victim && !world.quiet) freeze(world, victim, f.forMs, 'at a random instant');
    });
  database.scheduleFailover();
  if (spec.outageMinutes > 0) {
    sched.after(rng.int(Math.max(1, spec.minutes - spec.outageMinutes) * 60_000), () => {
      log('Stripe outage begins: every call 500');
      stripe.faults = { ...stripe.faults, error500: 1 };
      sched.after(spec.outageMinutes * 60_000, () => {
        log('Stripe outage ends');
        stripe.faults = world.quiet ? { ...NO_FAULTS } : { ...spec.faults };
      });
    });
  }
  if (spec.missingMeterMinutes > 0) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      log('temperature_readings meter archived at Stripe');
      stripe.meters.temperature_readings = false;
      sched.after(spec.missingMeterMinutes * 60_000, () => {
        log('temperature_readings meter reactivated');
        stripe.meters.temperature_readings = true;
      });
    });
  }
  for (let i = 0; i < spec.corrections; i++) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      if (world.dbDown) return; // the operator's request fails; nothing is voided
      const candidates = db.rows.filter(
        (r) =>
          r.kind === 'usage' &&
          // Corrections void readings (admin/corrections.ts): never an hourly report's count.
          r.eventName === 'temperature_readings' &&
          r.status !== 'expired' &&
          (world.voided.get(r.id) ?? 0n) < r.value &&
          // Not yet: a correction of a reading stamped ahead spins its key in the model (its claim
          // waits on usage the claim will not group until it is due); docs/architecture.md.
          r.occurredAt <= dbNow() + FUTURE_ALLOWANCE_MS,
      );
      const row = candidates[rng.int(candidates.length)];
      if (!row) return;
      const left = row.value - (world.voided.get(row.id) ?? 0n);
      const value = rng.next() < 0.5 ? left : 1n;
      // Voided readings are taken back at every destination that billed them (the rows of the same
      // ingestion at each destination).
      const readings = world.mirrors.get(row.id);
      for (const r of db.rows.filter((x) => x.kind === 'usage' && world.mirrors.get(x.id) === readings)) {
        world.voided.set(r.id, (world.voided.get(r.id) ?? 0n) + value);
        db.void(r, value);
        log(`operator voids ${value} of row ${r.id} (${r.destination}, ${r.status})`);
      }
      notifyAll(world);
    });
  }
  for (let i = 0; i < spec.redrives; i++) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      if (world.dbDown) return;
      const r = db.redrive(world.windowOf);
      for (const id of r.resent) world.calls.delete(id);
      // Each batch whose lease the redrive took may call once more, unrecorded (its settle is refused).
      world.counts.takeovers += r.revoked;
      log(
        `operator redrive: ${r.rows} rows, ${r.refused.length} groups refused (past the identifier window)`,
      );
      notifyAll(world);
    });
  }
}
