// The lease reaper: what a batch that died left (a lease never released, a fetched job never leased) is
// freed within seconds by any worker process, and its keys queued again.
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { NodeConnections } from './citus-nodes.js';
import type { LeaseLength } from './lease-length.js';
import { queueDeliveries } from './outbox.js';
import { expiredLeaseKeys, orphanedJobs, readOnWorker, reapLeases } from './reaper-sql.js';
import { keyName } from './rules/keys.js';

/**
 * The lease reaper: every LEASE_REAP_MS, each worker process frees what a batch that died left:
 * - leases past their expiry, never released (a live batch renews or releases its own): one
 *   statement; their keys are queued again;
 * - jobs it had fetched and not yet leased (killed between the fetch and the claim): delivery jobs
 *   active for longer than a lease whose key holds no live lease (a live batch leases its keys, or
 *   answers them, right after the fetch; and touches its jobs until it returns). They are completed as orphaned and their keys queued
 *   again, instead of waiting for pg-boss to expire them (minutes) or for the sweep.
 * So a killed worker's keys are resent within seconds of its leases' end. The leases' look reads every
 * key row (no index on the lease columns, so that the claim's and the settle's updates of a key row are
 * HOT: migrations/0077); the jobs' look reads pg-boss's index of active jobs that have a group (a
 * delivery job's group is its key), so it costs the queue's active jobs, not every job kept.
 */
export function startLeaseReaper(deps: {
  db: Kysely<DB>;
  boss: PgBoss;
  log: Logger;
  config: Pick<Config, 'DELIVERY_LEASE_SECONDS'>;
  /** Whether the database is distributed now (it may become so under a running worker). */
  distributed: () => boolean;
  wake: () => void;
  /** The process's lease length: a job's age to be orphaned is at least its current lease. */
  leaseLength?: Pick<LeaseLength, 'seconds' | 'takeOverAfterSeconds'>;
  /** The worker's node connections (CITUS_NODE_ROUTING=on): the reads of every shard go to a worker node. */
  nodes?: NodeConnections;
}): { stop(): void } {
  let running = false;
  let passes = 0;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    // Jobs sent without a group (by a release before groups) are read by a scan of pg-boss's whole job
    // table: on the first pass and every UNGROUPED_EVERY_PASSES-th after it, not on every pass.
    const ungrouped = passes++ % UNGROUPED_EVERY_PASSES === 0;
    reapOnce(deps, { ungrouped })
      .then((freed) => {
        if (freed.leases + freed.jobs > 0) deps.wake();
      })
      .catch((err: unknown) => deps.log.warn({ err }, 'lease reaper pass failed'))
      .finally(() => {
        running = false;
      });
  }, LEASE_REAP_MS);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
    },
  };
}

/** How often each worker looks for leases whose batch died. */
export const LEASE_REAP_MS = 2_000;

/**
 * One pass in this many also looks for orphaned jobs sent without a group (reaper-sql.ts orphanedJobs):
 * such a job, left by a batch that died, is found within a minute rather than two seconds. Only a
 * release before delivery jobs had groups sends them; the read goes once no such release can run.
 */
export const UNGROUPED_EVERY_PASSES = 30;

/**
 * One pass of the reaper: what a dead batch left is freed and its keys queued; returns how much.
 * `ungrouped`: orphaned jobs sent without a group are looked for too (a scan of pg-boss's job table).
 */
export async function reapOnce(
  deps: Pick<
    Parameters<typeof startLeaseReaper>[0],
    'db' | 'boss' | 'log' | 'config' | 'distributed' | 'leaseLength' | 'nodes'
  >,
  { ungrouped = true }: { ungrouped?: boolean } = {},
): Promise<{ leases: number; jobs: number }> {
  // Jobs first, leases freed after: a pass that stops or stalls between its statements (a slow
  // statement, a frozen or killed process) must not leave a key with neither a lease nor a job (it
  // did: the lease freed, the batch's own job completed meanwhile, the queueing statement 22 s late;
  // simulation seed 10681). An expired lease held on meanwhile changes nothing: a claim takes it over.
  // The orphans are completed after their keys are queued (one queued job per key: an active one does
  // not stop it), so that no instant between the two leaves their keys without a job either.
  // While this process's leases are longer than configured (its claims or renewals slow), a lease that
  // ran out is left to its owner for that much longer: the owner's renewal may be late, not its batch
  // dead (lease-length.ts, LeaseLength.takeOverAfterSeconds; 0 on a healthy database).
  const slack = deps.leaseLength?.takeOverAfterSeconds() ?? 0;
  // On Citus a read of every shard: on a worker node when claims are routed (reaper-sql.ts readOnWorker).
  const expired = deps.distributed()
    ? await readOnWorker(deps.nodes, deps.db, (on) => expiredLeaseKeys(on, slack))
    : await expiredLeaseKeys(deps.db, slack);
  // A job's age counts from its batch's last touch, and touches wait on a slow database as claims do:
  // while this process's claims are slow (its lease longer than configured), a job is orphaned only
  // once untouched for that longer lease (a key's own lease is read from its row in any case).
  const orphanSeconds = Math.max(deps.config.DELIVERY_LEASE_SECONDS, deps.leaseLength?.seconds() ?? 0);
  const orphans = await orphanedJobs(deps.db, orphanSeconds, deps.distributed(), slack, { ungrouped });
  const first = [...expired, ...orphans.flatMap((o) => (o.key ? [o.key] : []))];
  if (first.length > 0) await queueDeliveries(deps.boss, first);
  if (orphans.length > 0) {
    await deps.boss.complete(
      'meter-delivery',
      orphans.map((o) => o.id),
      { kind: 'orphaned' },
    );
  }
  const keys = await reapLeases(deps.db, {
    distributed: deps.distributed(),
    takeOverAfterSeconds: slack,
    ...(deps.nodes ? { nodes: deps.nodes } : {}),
  });
  // A lease that ran out between the read and the reap: queued now (one queued job per key: a key
  // queued above gets no second one).
  const seen = new Set(first.map(keyName));
  const late = keys.filter((k) => !seen.has(keyName(k)));
  if (late.length > 0) await queueDeliveries(deps.boss, late);
  if (keys.length + orphans.length > 0) {
    deps.log.info(
      { leases: keys.length, jobs: orphans.length },
      'freed what a batch that died left (leases, fetched jobs); keys queued again',
    );
  }
  return { leases: keys.length, jobs: orphans.length };
}
