// The stranded-row sweep: pending outbox rows older than SWEEP_STALE_SECONDS whose customer+meter
// has no queued or retrying delivery job get one, so a lost or purged job only delays billing. Each
// pass also marks delivered the v2 rows whose validation window passed without an error report
// (validation-window.ts), and analyzes the request path's tables once they outgrew their statistics
// (statistics.ts).
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import { longStatements } from '../db/dead-connections.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { analyzeStale, REQUEST_PATH_STALENESS, REQUEST_PATH_TABLES } from '../db/statistics.js';
import type { Logger } from '../log.js';
import { FUTURE_ALLOWANCE_SECONDS } from './claim-statement-sql.js';
import { deliveryKey, queueDeliveries } from './outbox.js';
import { sendJob } from './queues.js';
import { destinationOf, type KeyRef, keyRef } from './rules/keys.js';
import { promoteValidated } from './validation-window.js';

export interface SweepResult {
  /** Customer+meter pairs with stale pending rows. */
  keys: number;
  /** Of those, how many got a new delivery job. */
  enqueued: number;
}

/** Uncovered keys queued per pass; the oldest first, the rest on the next pass. */
const SWEEP_KEY_LIMIT = 1000;

/**
 * One pass, three statements however many keys: the stale keys nothing holds or paces, the ones a
 * queued or retrying job covers, and one insert of the others' jobs. Queuing next to a live active job costs nothing: the queue keeps one
 * queued job per key and the delivery lease keeps one Stripe call in flight.
 */
export async function sweepStrandedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  options: { staleSeconds: number; limit?: number },
): Promise<SweepResult> {
  const found = await staleKeys(db, {
    staleSeconds: options.staleSeconds,
    limit: options.limit ?? SWEEP_KEY_LIMIT,
  });
  const enqueued = found.keys.length > 0 ? await queueDeliveries(boss, found.keys) : 0;
  return { keys: found.stale, enqueued };
}

export interface SweepRuntime {
  stop(): void;
}

/**
 * One pass of the `outbox-sweep` job: stranded rows queued again, v2 rows past their validation window
 * delivered, and the statistics of the tables the request path reads by key refreshed where they have
 * grown stale (REQUEST_PATH_TABLES: a plan the API's connections keep reads every row of them until then).
 */
export async function sweepPass(deps: {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Config;
  log: Logger;
  /** Whether the database is distributed (Citus): its coordinator's tables are empty shells, never analyzed here. */
  distributed?: () => Promise<boolean>;
}): Promise<SweepResult & { validated: number; analyzed: string[] }> {
  const result = await sweepStrandedRows(deps.db, deps.boss, {
    staleSeconds: deps.config.SWEEP_STALE_SECONDS,
  });
  // v2 rows whose validation window passed with no error report naming them are delivered (rows
  // Stripe accepted: never the pending rows the sweep above looks for).
  const validated = await promoteValidated(deps.db, deps.config.DELIVERY_V2_VALIDATION_SECONDS);
  const analyzed = await refreshRequestPathStatistics(deps).catch((err: unknown) => {
    // Statistics help plans; the pass does not fail for them.
    deps.log.warn({ err }, 'statistics of the request path tables not refreshed');
    return [];
  });
  if (analyzed.length > 0) deps.log.debug({ analyzed }, 'request path tables analyzed');
  return { ...result, validated, analyzed };
}

/** The request path's tables analyzed where stale; on one node only (a Citus coordinator's are empty shells). */
async function refreshRequestPathStatistics(deps: {
  db: Kysely<DB>;
  distributed?: () => Promise<boolean>;
}): Promise<string[]> {
  if (await deps.distributed?.()) return [];
  return analyzeStale(deps.db, REQUEST_PATH_TABLES, REQUEST_PATH_STALENESS);
}

/**
 * Runs the sweep as the `outbox-sweep` job: each worker process asks for one every
 * SWEEP_INTERVAL_SECONDS (and once at start, so a restart after a crash recovers at once); the
 * queue's short policy keeps one queued request of all the processes' requests; a pass may start
 * while another runs (a pass killed with its worker never blocks the next).
 */
export async function startOutboxSweep(deps: {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Config;
  log: Logger;
  distributed?: () => Promise<boolean>;
}): Promise<SweepRuntime> {
  const log = deps.log.child({ queue: 'outbox-sweep' });
  // Its scans grow with the outbox's backlog: the long deadline.
  await deps.boss.work('outbox-sweep', { pollingIntervalSeconds: 1 }, ([job]) =>
    longStatements(async () => {
      const result = await sweepPass({ ...deps, log });
      if (result.enqueued > 0) {
        log.info(
          { jobId: job?.id, keys: result.keys, enqueued: result.enqueued },
          'sweep queued delivery of stranded outbox rows',
        );
      }
      return result;
    }),
  );
  const request = () => {
    sendJob(deps.boss, 'outbox-sweep', {}).catch((err: unknown) =>
      log.warn({ err }, 'could not queue the outbox sweep'),
    );
  };
  request();
  const timer = setInterval(request, deps.config.SWEEP_INTERVAL_SECONDS * 1000);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
    },
  };
}

/** Stale keys read per page before the ones a queued job covers are dropped. */
const SWEEP_SCAN_FACTOR = 5;

/** A job that covers a key: a per-key job by its name, or a batch job's entry as its payload lists it. */
type CoveringJob =
  | { key: string; customer: null; event_name: null; destination: null }
  | { key: null; customer: string; event_name: MeterEventName; destination: Destination | null };

interface StaleRow {
  organization_id: string;
  customer: string;
  event_name: MeterEventName;
  destination: Destination;
  /** min(created_at) as Postgres prints it: the page cursor, exact to the microsecond. */
  oldest: string;
}

/**
 * Keys with pending rows older than staleSeconds that nothing covers, oldest first. Covered, and so
 * left out before the limit is applied (so that however many covered keys are older, the uncovered
 * ones are reached): a key on a named hold (its meter is missing), a key leased, paced or backing off
 * (its batch or its follow-up job brings it back; a follow-up lost in a crash is seen once the wait
 * ends), correction rows waiting on a failed original (held until it is redriven), v2 rows Stripe
 * validates; then, in a second statement, keys with a queued or retrying job, of their own or a
 * meter-delivery-batch job that lists them (an `active` job may belong to a dead process, which the
 * lease reaper or pg-boss's expiry notices). Two statements a page, one over the outbox and one over
 * pg-boss's jobs (on Citus the outbox is distributed and pg-boss local to the coordinator, which one
 * statement cannot join). Pages of `limit` × 5 keys follow
 * a cursor (oldest row, then the key) until `limit` uncovered keys are found or no stale key is left:
 * a backlog of any number of covered keys older than a stranded one never hides it.
 */
export async function staleKeys(
  db: Kysely<DB>,
  options: { staleSeconds: number; limit: number },
): Promise<{ keys: KeyRef[]; stale: number }> {
  const pageSize = options.limit * SWEEP_SCAN_FACTOR;
  const keys: KeyRef[] = [];
  let stale = 0;
  let after: StaleRow | undefined;
  while (keys.length < options.limit) {
    const page = await sql<StaleRow>`
      SELECT o.organization_id, o.stripe_customer_id AS customer, o.event_name, o.destination,
             min(o.created_at)::text AS oldest
        FROM meter_outbox o
        -- Co-located on Citus: the key row is in its rows' shard group (joined on organization_id).
        LEFT JOIN meter_delivery_keys k ON k.organization_id = o.organization_id
                                       AND k.stripe_customer_id = o.stripe_customer_id AND k.event_name = o.event_name
                                       AND k.destination = o.destination
       WHERE o.status = 'pending' AND o.accepted_at IS NULL
         AND o.created_at < now() - make_interval(secs => ${options.staleSeconds})
         -- Usage stamped ahead is not stranded before it is due: the claim would find nothing to
         -- send (its key's wake-up job comes then; a lost one, the sweep once it is due).
         AND (o.kind = 'correction' OR o.identifier IS NOT NULL
              OR o.occurred_at <= now() + make_interval(secs => ${FUTURE_ALLOWANCE_SECONDS}))
         AND (k.stripe_customer_id IS NULL
              OR (k.hold IS NULL AND k.next_call_at <= now() AND (k.retry_at IS NULL OR k.retry_at <= now())
                  AND (k.lease_expires_at IS NULL OR k.lease_expires_at < now())))
         AND NOT (o.kind = 'correction' AND EXISTS (
               SELECT 1 FROM meter_outbox u
                WHERE u.id = o.corrects_outbox_id AND u.organization_id = o.organization_id AND u.status = 'failed'))
       GROUP BY o.organization_id, o.stripe_customer_id, o.event_name, o.destination
       ${
         after
           ? sql`HAVING (min(o.created_at), o.organization_id, o.stripe_customer_id, o.event_name::text, o.destination::text)
                      > (${after.oldest}::timestamptz, ${after.organization_id}::uuid, ${after.customer}::text,
                         ${after.event_name}::text, ${after.destination}::text)`
           : sql``
       }
       ORDER BY min(o.created_at), o.organization_id, o.stripe_customer_id, o.event_name::text, o.destination::text
       LIMIT ${pageSize}`.execute(db);
    if (page.rows.length === 0) break;
    stale += page.rows.length;
    after = page.rows[page.rows.length - 1];
    const names = page.rows.map((r) => deliveryKey(r.customer, r.event_name, r.destination));
    const customers = [...new Set(page.rows.map((r) => r.customer))];
    // One statement for both kinds of job that cover a key: a queued or retrying meter-delivery job
    // of its own (COALESCE as pg-boss's index of queued singleton jobs has it: one lookup per key),
    // or a queued or retrying meter-delivery-batch job (the hourly report's, a hundred or so, and the
    // groups' idle keys', fetched within a poll while a worker runs) that
    // lists it. The batch jobs' entries come back as their payload has them, narrowed to the page's
    // customers, and are named here by deliveryKey: the key's name has one definition, in TypeScript.
    const covered = await sql<CoveringJob>`
      SELECT j.singleton_key AS key, NULL AS customer, NULL AS event_name, NULL AS destination
        FROM pgboss.job j
       WHERE j.name = 'meter-delivery' AND j.state IN ('created', 'retry')
         AND COALESCE(j.singleton_key, '') = ANY(${names}::text[])
      UNION ALL
      SELECT NULL, e->>'customerId', e->>'eventName', e->>'destination'
        FROM pgboss.job j CROSS JOIN LATERAL jsonb_array_elements(j.data->'keys') e
       WHERE j.name = 'meter-delivery-batch' AND j.state IN ('created', 'retry')
         AND e->>'customerId' = ANY(${customers}::text[])`.execute(db);
    const coveredKeys = new Set(
      covered.rows.map((r) =>
        r.key !== null
          ? r.key
          : deliveryKey(r.customer, r.event_name, destinationOf({ destination: r.destination ?? undefined })),
      ),
    );
    for (const r of page.rows) {
      if (keys.length >= options.limit) break;
      if (coveredKeys.has(deliveryKey(r.customer, r.event_name, r.destination))) continue;
      keys.push(
        keyRef({
          organizationId: r.organization_id,
          customerId: r.customer,
          eventName: r.event_name,
          destination: r.destination,
        }),
      );
    }
    if (page.rows.length < pageSize) break;
  }
  return { stale, keys };
}
