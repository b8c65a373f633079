// The database as the workers see it: every statement a round trip on the virtual clock (slow ones,
// silent connections, errors, a crash right after a commit), the standby a claim's commit waits for,
// the failover that promotes it, the delivery store (store.ts) over the model, and each destination's
// shared call budget (budget.ts), which is a database row in the product.
import type { Destination } from '../../src/db/schema.js';
import type { DeliveryStore } from '../../src/metering/batch-deps.js';
import type { CallSlots } from '../../src/metering/budget.js';
import { LEASE_WORK_FACTOR } from '../../src/metering/lease-length.js';
import { type KeyRef, keyName, leaseGrantedTo } from '../../src/metering/rules/keys.js';
import type { ModelState, Row } from './model.js';
import { ACCESS_REFUSED_MESSAGE } from './stripe-model.js';
import {
  CLIENT_TIMEOUT_MS,
  crash,
  type InFlight,
  METRONOME_RATE,
  notifyAll,
  notifyBatch,
  START,
  STEP_CRASH_RATE,
  type Worker,
  type World,
} from './world.js';

export interface Database {
  /**
   * One statement of worker `w`: sent now, executed on arrival (even if `w` died meanwhile, unless
   * dropped), answered if `w` lives, when it is not frozen. `durable`: a commit no call may precede
   * the standby's copy of (a claim). `claims`: the keys a claim locks while it runs.
   */
  statement<T>(
    w: Worker,
    run: () => T,
    options?: { mayFail?: boolean; durable?: boolean; claims?: readonly KeyRef[] },
  ): Promise<T>;
  /** The wait for the standby before a commit is answered (synchronous: every commit; asynchronous: the claims). */
  standbyWait(durable: boolean): number;
  /** Keys of claims still running (sent, not committed), with how many: the reaper must leave them. */
  readonly claimsRunning: Map<string, number>;
  /** The delivery store (store.ts) worker `w` uses for `destination`. */
  storeOf(w: Worker, destination: Destination): DeliveryStore;
  /** The call budget's slots worker `w` takes for `destination`. */
  slotsOf(w: Worker, destination: Destination): CallSlots;
  /** The profile's failover, scheduled. */
  scheduleFailover(): void;
}

/** `restart`: a worker started again a few seconds after a crash right after a statement. */
export function openDatabase(world: World, restart: () => void): Database {
  const { sched, db, rng, hostileRng, profile, mutations, spec, log, violate, now, dbNow } = world;
  const claimsRunning = new Map<string, number>();
  const lockClaim = (keys: readonly KeyRef[] | undefined, by: 1 | -1) => {
    for (const k of keys ?? []) {
      const name = keyName(k);
      for (const m of [claimsRunning, db.claiming]) {
        const n = (m.get(name) ?? 0) + by;
        if (n > 0) m.set(name, n);
        else m.delete(name);
      }
    }
  };
  /** How long a statement takes: milliseconds, or (hostile, before the world quiets) up to tens of seconds. */
  const statementLatency = () => {
    const base = 1 + rng.int(5);
    if (world.quiet || profile.slowStatements === 0 || hostileRng.next() >= profile.slowStatements)
      return base;
    return 10 + hostileRng.int(profile.slowMaxMs);
  };
  const standbyWait = (durable: boolean) => {
    const f = profile.failover;
    if (!f || world.dbGeneration > 0) return 0;
    if (f.kind === 'sync') return f.lagMs;
    return durable && !mutations.has('noStandbyWait') ? f.lagMs : 0;
  };

  const statement = <T>(
    w: Worker,
    run: () => T,
    options: { mayFail?: boolean; durable?: boolean; claims?: readonly KeyRef[] } = {},
  ): Promise<T> => {
    const latency = statementLatency();
    world.longestStatementMs = Math.max(
      world.longestStatementMs,
      latency + standbyWait(options.durable === true),
    );
    const generation = world.dbGeneration;
    // A statement sent while no server is up reaches none: it locks nothing (it fails on connect).
    let locked = !world.dbDown;
    // A claim's key rows stay locked until it commits, or until the server stops it (its worker died).
    const unlock = () => {
      if (!locked) return;
      locked = false;
      if (generation === world.dbGeneration) lockClaim(options.claims, -1);
    };
    const sent: InFlight = { dropped: false, commitsAt: now() + latency, stop: unlock };
    w.inFlight.add(sent);
    // A connection that goes silent: no answer ever; the client's own timeout ends the wait.
    const silent =
      !world.quiet && profile.silentConnections > 0 && hostileRng.next() < profile.silentConnections;
    if (locked) lockClaim(options.claims, 1);
    return new Promise<T>((resolve, reject) => {
      let answered = false;
      const answer = (settle: () => void) => {
        if (answered) return;
        answered = true;
        w.gate(() => {
          if (w.alive) settle();
        });
      };
      const fail = (message: string) => answer(() => reject(new Error(message)));
      if (silent) sched.after(CLIENT_TIMEOUT_MS, () => fail('the connection went silent: no answer in time'));
      sched.after(latency, () => {
        w.inFlight.delete(sent);
        unlock();
        if (sent.dropped) return;
        if (world.dbDown || generation !== world.dbGeneration) {
          if (!silent) fail('the connection to the database was lost');
          return;
        }
        if (options.mayFail && rng.next() < spec.dbErrorRate) {
          if (w.alive) fail('simulated database error');
          return;
        }
        let value: T;
        try {
          value = run();
        } catch (err) {
          if (w.alive) answer(() => reject(err));
          return;
        }
        // A crash right after a statement committed, before its answer reached the process: the
        // step between any two of delivery's statements (after a fetch, a claim, a settle…).
        if (w.alive && world.stepCrashesLeft > 0 && !world.quiet && rng.next() < STEP_CRASH_RATE) {
          world.stepCrashesLeft--;
          crash(world, w);
          sched.after(1000 + rng.int(5_000), () => {
            if (!world.quiet || world.workers.every((x) => !x.alive)) restart();
          });
          return;
        }
        if (silent) return;
        const wait = standbyWait(options.durable === true);
        if (wait === 0) answer(() => resolve(value));
        else
          sched.after(wait, () => {
            // The primary died before the standby had the commit: the client never hears of it.
            if (generation !== world.dbGeneration) fail('the connection to the database was lost');
            else answer(() => resolve(value));
          });
      });
    });
  };

  /** Whether `owner` holds the lease of the key of `r` now, by the database's clock. */
  // A batch still holds its key while the key's owner is its own: a lease that ran out but that nobody
  // reaped or took is still the batch's (settleBatch, renewLeases); a key reaped or taken is lost.
  const holdsLease = (owner: string, r: Row) => db.keys.get(keyName(r))?.leaseOwner === owner;
  const rowsState = (identifier: string) =>
    db.rows
      .filter((r) => r.identifier === identifier)
      .map((r) => `${r.status}/${r.attempts}/${r.acceptedAt}`)
      .join();
  /** The groups of a settle whose key's lease `owner` no longer holds, with their rows' state now. */
  const staleGroups = (groups: readonly { identifier: string }[], owner: string) => {
    const out = new Map<string, string>();
    for (const g of groups) {
      const head = db.rows.find((r) => r.identifier === g.identifier);
      if (head && !holdsLease(owner, head)) out.set(g.identifier, rowsState(g.identifier));
    }
    return out;
  };

  /**
   * A lease grows only for the database's slowness (lease-length.ts): to LEASE_WORK_FACTOR times the
   * longest statement so far (a claim and a renewal are one statement here), within the configured
   * bounds. A longer one grew for something else: the process's own freeze, timed as the database's.
   */
  const checkLeaseLength = (owner: string, seconds: number, what: string) => {
    const base = world.config.DELIVERY_LEASE_SECONDS;
    const cap = Math.max(base, world.config.DELIVERY_LEASE_MAX_SECONDS);
    const allowed = Math.min(
      cap,
      Math.max(base, Math.ceil((LEASE_WORK_FACTOR * world.longestStatementMs) / 1000)),
    );
    if (seconds > allowed)
      violate(
        `a ${what} of ${owner} asked for a lease of ${seconds} s; the database's statements took at most ${world.longestStatementMs} ms, which grow a lease to ${allowed} s`,
      );
  };

  const storeOf = (w: Worker, destination: Destination): DeliveryStore => ({
    claim: (keys, options) => {
      checkLeaseLength(options.owner, options.leaseSeconds, 'claim');
      return statement(
        w,
        () => {
          for (const k of keys) {
            const row = db.keys.get(keyName(k));
            // (A lease a redrive revoked was counted as taken over then: load.ts.)
            const revoked = row?.leaseOwner && leaseGrantedTo(row.leaseOwner) !== row.leaseOwner;
            const slackMs = (options.takeOverAfterSeconds ?? 0) * 1000;
            if (
              row?.leaseOwner &&
              !revoked &&
              row.leaseExpiresAt &&
              row.leaseExpiresAt.getTime() + slackMs < dbNow()
            )
              world.counts.takeovers++;
          }
          const claimed = db.claim(keys, options);
          for (const x of world.workers) if (x.alive) x.reap();
          log(
            `${w.id} claim ${options.owner}: ${claimed.map((k) => `${k.customerId}=${k.state}${k.state === 'leased' && k.group ? `#${k.group.identifier.slice(-6)}` : ''}`).join(' ')}`,
          );
          return claimed;
        },
        // No call before the standby has the claim's identifiers (else a failover regroups them).
        { mayFail: true, durable: true, claims: keys },
      );
    },
    claimCorrections: (key, options) =>
      statement(w, () => db.claimCorrections(key, options), { mayFail: true, durable: true }),
    switchToCompensate: (key, identifier, owner) =>
      statement(w, () => db.switchToCompensate(key, identifier, owner), { durable: true }),
    // Every job of the simulation names its organization.
    organizationsOf: async () => new Map(),
    settle: (groups, keys, options) =>
      statement(
        w,
        () => {
          const stale = staleGroups(groups, options.owner);
          const refused = db.settle(groups, keys, options);
          for (const [identifier, before] of stale)
            if (rowsState(identifier) !== before)
              violate(
                `a settle of ${options.owner}, whose lease had run out and been reaped or taken, changed the rows of ${identifier}`,
              );
          for (const g of groups) {
            if (g.status === 'failed') world.counts.deadLetters++;
            // A timestamp the destination finds too far ahead becomes sendable as time passes: it is
            // retried until due, never failed (with the valid readings of its group).
            if (g.status === 'failed' && g.error !== undefined && /in the future/i.test(g.error))
              violate(`group ${g.identifier} failed for a timestamp in the future: ${g.error}`);
            // A connected account that refuses the platform access holds its own keys: its groups wait,
            // uncounted, until the account is back; never failed for it (rules/decide-batch.ts connectHold).
            if (g.status === 'failed' && g.error?.includes(ACCESS_REFUSED_MESSAGE))
              violate(`group ${g.identifier} failed for its account's access refusal: ${g.error}`);
            for (const r of db.rows) {
              if (r.identifier === g.identifier && r.attempts > spec.retryLimit + 1) {
                violate(`row ${r.id} has ${r.attempts} attempts, limit ${spec.retryLimit}`);
              }
            }
          }
          return refused;
        },
        { mayFail: true },
      ),
    release: (owner, nextCallAt) => statement(w, () => db.release(owner, nextCallAt)),
    renew: (owner, seconds) => {
      checkLeaseLength(owner, seconds, 'renewal');
      return statement(w, () => db.renew(owner, seconds));
    },
    hold: (keys) => statement(w, () => db.hold(keys)),
    queue: (keys) =>
      statement(w, () => {
        for (const k of keys) {
          const job = db.insertJob(k.key, dbNow() + k.afterMs);
          if (job) log(`${w.id} follow-up ${job.id} ${job.name} in ${k.afterMs} ms`);
        }
        notifyAll(world);
      }),
    rateLimited: () => statement(w, () => slowDown(destination)),
  });

  // ── each destination's shared call budget (budget.ts, modelled): GCRA with a 2 s horizon, halved by a 429 ──
  const budgets = {
    stripe: { rate: spec.accountRate, tat: START, factor: 1, last429: 0 },
    metronome: { rate: METRONOME_RATE, tat: START, factor: 1, last429: 0 },
  };
  const effectiveRate = (b: (typeof budgets)['stripe']) =>
    b.rate * Math.min(1, b.factor + (now() - b.last429) / 30_000);
  const slowDown = (destination: Destination) => {
    const b = budgets[destination];
    if (now() - b.last429 > 1000) b.factor = Math.max(0.05, (effectiveRate(b) / b.rate) * 0.5);
    b.last429 = now();
  };
  const slotsOf = (w: Worker, destination: Destination): CallSlots => ({
    take: () =>
      statement(w, () => {
        const b = budgets[destination];
        const t = now();
        if (b.tat - t > 2_000) return { granted: false, waitMs: b.tat - t - 2_000 + 1 };
        const at = Math.max(b.tat, t);
        b.tat = at + 1000 / effectiveRate(b);
        return { granted: true, waitMs: at - t };
      }),
  });

  /**
   * The profile's failover: the primary dies; the standby, promoted a little later, has what the
   * primary had committed `lagMs` before its death. With a synchronous standby nothing answered is
   * lost (a commit is answered once the standby has it: what it lacks, the clients were never told
   * of, and sensors send again); with an asynchronous one, readings answered in the last moments are
   * lost, which the database documents (they are counted, and left out of the ledger with their rows).
   */
  const scheduleFailover = () => {
    const f = profile.failover;
    if (!f) return;
    let standby: ModelState | undefined;
    sched.after(Math.max(0, f.atMs - f.lagMs), () => {
      standby = db.snapshot();
    });
    sched.after(f.atMs, () => {
      const rowsAtDeath = db.rows;
      world.dbDown = true;
      world.dbGeneration++;
      // The old primary's sessions are gone, and the claims they were running with them.
      claimsRunning.clear();
      world.lastDisruption = now();
      log(
        `the primary dies; its ${f.kind === 'sync' ? 'synchronous' : 'asynchronous'} standby lags ${f.lagMs} ms`,
      );
      sched.after(f.promotionMs, () => {
        const had = new Set(standby!.rows.map((r) => r.nonce));
        const lost = rowsAtDeath.filter((r) => !had.has(r.nonce));
        db.promoteStandby(standby!);
        world.dbDown = false;
        world.lastDisruption = now();
        for (const r of lost) {
          // A report's rows the standby lacks: a synchronous standby's were never acknowledged (the report's
          // job failed and is retried, workers.ts); an asynchronous one's are lost with the hour's report.
          if (r.kind !== 'usage' || r.eventName !== 'temperature_readings') continue;
          const reading = world.mirrors.get(r.id);
          if (f.kind === 'async') {
            world.counts.readingsLost++;
            continue;
          }
          const again = db.ingest(r, r.value, r.occurredAt).row;
          if (reading !== undefined) world.mirrors.set(again.id, reading);
        }
        world.voided.clear();
        for (const c of db.rows)
          if (c.kind === 'correction' && c.correctsId !== null)
            world.voided.set(c.correctsId, (world.voided.get(c.correctsId) ?? 0n) + c.value);
        log(`standby promoted: ${lost.length} rows it lacked (${f.kind === 'sync' ? 'sent again' : 'lost'})`);
        notifyAll(world);
        notifyBatch(world);
      });
    });
  };

  return { statement, standbyWait, claimsRunning, storeOf, slotsOf, scheduleFailover };
}
