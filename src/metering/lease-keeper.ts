// The lease keeper: what keeps a running batch's claim on its work alive, on a connection of its own.
//
// A running batch renews its keys' leases (batch-lease.ts) and touches its pg-boss jobs
// (LeaseKeeper.touchWhileRunning, started by the fetcher: delivery.ts) every third of the lease. On the
// process's pool those statements queued behind the
// claims and settles of the other fetchers (8 fetchers, DB_POOL_MAX 10): on a slow database with a
// backlog a claim holds its connection for tens of seconds, so a renewal waited for a connection past
// the lease, the reaper freed the lease of a batch that was still running and its settle was refused
// (2,188-5,598 leases reaped per 10 s run, docs/benchmarks.md, "A slow database with a backlog").
//
// Here every renewal and touch of the process goes through one connection that nothing else uses
// (DATABASE_DIRECT_URL: never behind a pooler's queue either), and requests that arrive while a
// statement runs are merged into the next one: each tick costs at most one renewal and one touch
// statement, whatever the number of batches, and a renewal never waits: rows another statement holds
// are passed over (SKIP LOCKED; such a key's lease lapsed and is being taken or reaped) rather than
// waited for, and the batch's deadline then stays where it was (batch.ts moves it only when every key
// was renewed).
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { renewLeasesOf } from './lease-sql.js';

export interface LeaseKeeper {
  /** Renews `owner`'s leases on keys of `organizationIds`; resolves to how many keys it still holds. */
  renew(owner: string, organizationIds: readonly string[], leaseSeconds: number): Promise<number>;
  /** Touches running meter-delivery jobs (pg-boss's `heartbeat_on`, on the database's clock). */
  touch(ids: readonly string[]): Promise<void>;
  /**
   * Touches a running batch's jobs (pg-boss's `heartbeat_on`, set on the database's clock) every
   * `touchEveryMs` from the batch's start to its end: the reaper takes a fetched job as orphaned only
   * once its last heartbeat (the fetch, or a touch) is a lease old. Without this a job's age counted
   * from its fetch, so a batch still running past the lease on a slow database (a claim of 30 s, a
   * settle that released the key before pg-boss completed the job) had its jobs completed as orphaned
   * and its keys queued again under it: 1,638 jobs in a 30-second backlog run with the default lease,
   * none with a 60 s lease (docs/benchmarks.md, "A slow database with a backlog"). A frozen process
   * touches nothing, so its jobs are freed as before. The queue sets no `heartbeatSeconds`, so
   * pg-boss's own monitor ignores these.
   */
  touchWhileRunning(ids: readonly string[]): { stop(): Promise<void> };
}

/**
 * Runs one statement at a time, in order. The keeper's connection is one (max 1), and renewals and
 * touches each coalesce on their own: without this a renewal and a touch were sent together, and the
 * second waited for the one connection in pg-pool's queue, where its 5 s connect timeout failed it when
 * the first took longer (a slow database: renewals and touches failed, leases lapsed and were reaped).
 * Here the second waits for the first however long it takes; a dead connection is still found by the
 * statement deadline of the first.
 */
function oneAtATime(): <T>(run: () => Promise<T>) => Promise<T> {
  let tail: Promise<unknown> = Promise.resolve();
  return <T>(run: () => Promise<T>) => {
    const next = tail.then(run, run);
    tail = next.catch(() => undefined);
    return next;
  };
}

/** Requests that arrive while a statement runs wait for it and go together in the next one. */
function coalescing<R, A>(run: (requests: R[]) => Promise<A[]>): (request: R) => Promise<A> {
  let queue: { request: R; resolve: (a: A) => void; reject: (err: unknown) => void }[] = [];
  let running = false;
  const flush = async () => {
    running = true;
    while (queue.length > 0) {
      const batch = queue;
      queue = [];
      try {
        const answers = await run(batch.map((q) => q.request));
        for (const [i, q] of batch.entries()) q.resolve(answers[i] as A);
      } catch (err) {
        for (const q of batch) q.reject(err);
      }
    }
    running = false;
  };
  return (request) =>
    new Promise<A>((resolve, reject) => {
      queue.push({ request, resolve, reject });
      if (!running) void flush();
    });
}

/**
 * A keeper over `db` (a pool of its own, one connection: src/metering/delivery-parts.ts opens it) and
 * `executeSql` on the same connection for pg-boss's own touch statement. A running batch's jobs are
 * touched every `touchEveryMs` (the renewals' cadence, batch-lease.ts renewEveryMs); a failed touch is
 * said on `log`.
 */
export function createLeaseKeeper(deps: {
  db: Kysely<DB>;
  boss: Pick<PgBoss, 'touch'>;
  executeSql: (text: string, values?: unknown[]) => Promise<{ rows: unknown[] }>;
  distributed: () => boolean;
  touchEveryMs: number;
  log: Logger;
}): LeaseKeeper {
  type Renewal = { owner: string; organizationIds: readonly string[]; leaseSeconds: number };
  const serial = oneAtATime();
  const renewAll = async (requests: Renewal[]): Promise<number[]> => {
    const held = new Map<string, number>();
    // Every batch of a process has the same lease; grouped by length all the same.
    for (const seconds of new Set(requests.map((r) => r.leaseSeconds))) {
      const own = requests.filter((r) => r.leaseSeconds === seconds);
      // On Citus one statement per shard group, on the coordinator (lease-sql.ts).
      const counts = await renewLeasesOf(
        deps.db,
        own.map((r) => r.owner),
        {
          leaseSeconds: seconds,
          organizationIds: [...new Set(own.flatMap((r) => r.organizationIds))],
          skipLocked: true,
          distributed: deps.distributed(),
        },
      );
      for (const [owner, n] of counts) held.set(owner, n);
    }
    return requests.map((r) => held.get(r.owner) ?? 0);
  };
  const renew = coalescing<Renewal, number>((requests) => serial(() => renewAll(requests)));
  const touch = coalescing<readonly string[], undefined>((requests) =>
    serial(async () => {
      const ids = [...new Set(requests.flat())];
      if (ids.length > 0)
        await deps.boss.touch('meter-delivery', ids, { db: { executeSql: deps.executeSql } });
      return requests.map(() => undefined);
    }),
  );
  const touchNow = async (ids: readonly string[]) => {
    if (ids.length > 0) await touch(ids);
  };
  return {
    renew: (owner, organizationIds, leaseSeconds) => renew({ owner, organizationIds, leaseSeconds }),
    touch: touchNow,
    touchWhileRunning: (ids) => {
      let pending: Promise<unknown> = Promise.resolve();
      let busy = false;
      const timer = setInterval(() => {
        if (busy || ids.length === 0) return;
        busy = true;
        pending = touchNow(ids)
          .catch((err: unknown) =>
            deps.log.warn({ err }, "could not touch the running batch's delivery jobs"),
          )
          .finally(() => {
            busy = false;
          });
      }, deps.touchEveryMs);
      timer.unref();
      return {
        async stop() {
          clearInterval(timer);
          await pending;
        },
      };
    },
  };
}
