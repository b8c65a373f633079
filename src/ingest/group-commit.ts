// Group commit for POST /v1/readings: concurrent requests of one API process are written together
// in ONE transaction and ONE statement, so a single-reading request no longer pays a whole
// transaction (round trips, commit, WAL flush) of its own. Every request keeps its own answer:
// inserted/duplicates, or its own 422 problems (one request's unknown sensor never rejects another).
// The contract holds per transaction: one meter_outbox row per billable organization and destination
// in force (organization_destinations, read in the same statement), its value the rows that
// organization inserted, each of those readings naming the first of them (outbox_id; the others
// mirror it), and the delivery hand-off once per transaction and delivery key.
//
// Why this file is long: one class whose queue, flush and per-request answers share its state, and the one
// statement it runs.
import { sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import {
  type Crossing,
  crossingOf,
  thresholdCountCall,
  thresholdProbeCte,
  writeCrossings,
} from '../alerts/thresholds.js';
import type { Database } from '../db/database.js';
import { isDatabaseUnavailable, sqlState } from '../db/errors.js';
import type { DB, Destination } from '../db/schema.js';
import { citusRouter, type ShardRouter } from '../metering/delivery-sql-shapes.js';
import { enqueueDeliveries, lockQueuedDeliveriesAt } from '../metering/outbox.js';
import type { KeyRef } from '../metering/rules/keys.js';
import {
  billingInForce,
  type GroupRequest,
  groupOutcomes,
  type ProblemRow,
  problemsByRequest,
  readingColumns,
  type StoreReadingsOutcome,
  traceparentsByOrganization,
  usageKey,
} from './readings.js';
import { storeShardGroup } from './routed.js';

export type { GroupRequest } from './readings.js';

interface Pending extends GroupRequest {
  resolve(outcome: StoreReadingsOutcome): void;
  reject(err: unknown): void;
}

interface GroupRow {
  kind: 'r' | 'p' | 'c' | 'h' | 'x';
  req: number | null;
  inserted: number | null;
  n: number | null;
  active: boolean | null;
  customer: string | null;
  destination: Destination | null;
  org: string | null;
}

/**
 * Writes a group of validated requests in the caller's transaction with one statement, then hands
 * the new outbox rows to delivery (once per delivery key). The statement also share-locks the keys'
 * already queued delivery jobs (lockQueuedDeliveries), so in the steady state, where every key has
 * one, a group is BEGIN, one statement and COMMIT. Rows are inserted in (sensor, instant)
 * order whatever request they came from, so concurrent groups take row locks in one order and cannot
 * deadlock; within a group the earliest request wins a reading sent twice. One node: Citus routes no
 * INSERT ... SELECT, and a distributed database takes storeShardGroup's router statements (routed.ts)
 * once per shard group instead.
 */
export async function storeGroup(
  trx: Transaction<DB>,
  boss: PgBoss,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<StoreReadingsOutcome[]> {
  const { req, org, sensor, recordedAt, temperature, offsets } = readingColumns(requests);
  // Trace contexts only while tracing records: without them the statement is the one it always was.
  const traced = traceparentsByOrganization(requests);
  const traceColumn = traced.size > 0 ? sql`, traceparent` : sql``;
  const traceValue =
    traced.size > 0
      ? sql`, (SELECT t.tp FROM unnest(${[...traced.keys()]}::uuid[], ${[...traced.values()]}::text[]) AS t(org, tp)
                WHERE t.org = b.org)`
      : sql``;
  const result = await sql<GroupRow>`
    WITH input AS MATERIALIZED (
      SELECT r.req, r.org, r.sensor_id, r.recorded_at, r.temperature_c, r.n
      FROM unnest(${req}::int[], ${org}::uuid[], ${sensor}::uuid[], ${recordedAt}::timestamptz[],
                  ${temperature}::float8[]) WITH ORDINALITY AS r(req, org, sensor_id, recorded_at, temperature_c, n)
    ), known AS (
      SELECT s.id, s.organization_id, s.active FROM sensors s
      WHERE s.id IN (SELECT sensor_id FROM input)
    ), problems AS (
      -- A sensor of another organization reads "unknown": its existence is never revealed.
      SELECT i.req, i.n, k.active FROM input i
      LEFT JOIN known k ON k.id = i.sensor_id AND k.organization_id = i.org
      WHERE k.active IS NOT TRUE
    ), ok AS (
      -- Uncorrelated (NOT IN over a non-null column), which Citus also plans.
      SELECT i.* FROM input i WHERE i.req NOT IN (SELECT p.req FROM problems p)
    ), billing AS (
      ${billingInForce(sql`SELECT DISTINCT org FROM ok`, now, sql`, nextval(pg_get_serial_sequence('meter_outbox', 'id')) AS outbox_id`)}
    ), named AS (
      -- The row the readings name: the billing destination's; its rows at other destinations mirror it.
      SELECT DISTINCT ON (org) org, outbox_id FROM billing ORDER BY org, role = 'billing' DESC, outbox_id
    ), stored AS (
      INSERT INTO temperature_readings
        (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT o.sensor_id, o.recorded_at, o.org, o.temperature_c, ${now}, b.outbox_id
      FROM ok o LEFT JOIN named b ON b.org = o.org
      ORDER BY o.sensor_id, o.recorded_at, o.req, o.n
      ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING
      RETURNING sensor_id, recorded_at, organization_id
    ), winners AS (
      SELECT DISTINCT ON (o.sensor_id, o.recorded_at) o.req, o.sensor_id, o.recorded_at
      FROM ok o ORDER BY o.sensor_id, o.recorded_at, o.req, o.n
    ), per_request AS (
      SELECT w.req, count(*)::int AS inserted
      FROM stored s JOIN winners w ON w.sensor_id = s.sensor_id AND w.recorded_at = s.recorded_at
      GROUP BY w.req
    ), per_org AS (
      SELECT organization_id AS org, count(*)::int AS inserted FROM stored GROUP BY organization_id
    ), outbox AS (
      INSERT INTO meter_outbox (id, organization_id, event_name, stripe_customer_id, value, occurred_at,
                                destination, mirrors_outbox_id${traceColumn})
      OVERRIDING SYSTEM VALUE
      SELECT b.outbox_id, b.org, 'temperature_readings', b.stripe_customer_id, p.inserted, ${now},
             b.destination, nullif(n.outbox_id, b.outbox_id)${traceValue}
      FROM per_org p JOIN billing b ON b.org = p.org JOIN named n ON n.org = b.org
      RETURNING organization_id, stripe_customer_id, destination
    ), held AS (
      ${lockQueuedDeliveriesAt('temperature_readings', sql`SELECT stripe_customer_id, destination FROM billing`)}
    ), ${thresholdProbeCte(sql`per_org`)}
    SELECT 'r' AS kind, req, inserted, NULL::int AS n, NULL::boolean AS active, NULL::text AS customer,
           NULL::text AS destination, NULL::uuid AS org
      FROM per_request
    UNION ALL
    SELECT 'p', req, NULL, n::int, active, NULL, NULL, NULL FROM problems
    UNION ALL
    SELECT 'c', NULL, NULL, NULL, NULL, stripe_customer_id, destination, organization_id FROM outbox
    UNION ALL
    SELECT 'h', NULL, NULL, NULL, NULL, key, NULL, NULL FROM held
    UNION ALL
    -- What the organizations of the group that have thresholds stored, counted into them: their crossings.
    SELECT 'x', NULL, NULL, NULL, NULL, c.j, NULL, NULL FROM ${thresholdCountCall(sql`${now}::timestamptz`)} AS c`.execute(
    trx,
  );

  const inserted = new Map<number, number>();
  const problemRows: ProblemRow[] = [];
  const customers: KeyRef[] = [];
  const held = new Set<string>();
  const crossings: Crossing[] = [];
  for (const row of result.rows) {
    if (row.kind === 'r' && row.req !== null) inserted.set(row.req, row.inserted ?? 0);
    else if (row.kind === 'p' && row.req !== null && row.n !== null)
      problemRows.push({ req: row.req, n: row.n, active: row.active });
    else if (row.kind === 'c' && row.customer && row.org)
      customers.push(usageKey(row.org, row.customer, row.destination ?? 'stripe'));
    else if (row.kind === 'h' && row.customer) held.add(row.customer);
    else if (row.kind === 'x' && row.customer) crossings.push(crossingOf(row.customer));
  }
  await enqueueDeliveries(trx, boss, customers, held);
  if (crossings.length > 0) await writeCrossings(trx, boss, crossings, now);
  return groupOutcomes(requests, problemsByRequest(problemRows, offsets), inserted);
}

/**
 * One request written alone (a request with an Idempotency-Key, a group's request after its group
 * failed): a group of one, in the shape of the database (storeShardGroup on a distributed one).
 */
export async function storeRequest(
  trx: Transaction<DB>,
  boss: PgBoss,
  request: GroupRequest,
  now: Date,
  distributed = false,
): Promise<StoreReadingsOutcome> {
  const [outcome] = await (distributed ? storeShardGroup : storeGroup)(trx, boss, [request], now);
  return outcome!;
}

/** Attempts of a group whose transaction Postgres rolled back as a deadlock or serialization victim. */
const ROLLED_BACK_ATTEMPTS = 3;

/**
 * Runs `write` (one transaction) again when Postgres rolled it back as the victim of a deadlock or a
 * serialization failure: nothing of it was stored, and Postgres's own advice is to run it again. On
 * one node ingestion takes its locks in one order and never deadlocks; on Citus, a group can meet a
 * delivery claim or a correction on the shards (the distributed deadlock detector cancels one).
 * Without this the requests answered 503, and the sensor resent them seconds later.
 */
async function retryRolledBack<T>(write: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await write();
    } catch (err) {
      const state = sqlState(err);
      if (attempt >= ROLLED_BACK_ATTEMPTS || (state !== '40P01' && state !== '40001')) throw err;
      await new Promise((resolve) => setTimeout(resolve, 10 + Math.floor(Math.random() * 40) * attempt));
    }
  }
}

export interface GroupCommitOptions {
  /** How long the first request of a group waits for others (ms). */
  windowMs: number;
  /** Most requests in one group. */
  maxRequests: number;
  /** Most readings in one group (a large batch is written alone rather than delaying others). */
  maxReadings: number;
  /**
   * Most groups being written at once. While that many are in flight, new requests wait together
   * and go as the next group as soon as one finishes: under load, groups grow instead of commits
   * multiplying. Every group's commit waits for the WAL flush, and the commits of transactions that
   * queue a job also pass one at a time through Postgres's NOTIFY lock (pg-boss wakes the workers
   * with a NOTIFY in the same transaction): more groups at once only queue there.
   */
  maxInFlight?: number;
  /** A test seam (see GroupGate); production runs without one. */
  gate?: GroupGate;
}

/**
 * A test seam: whether a request lands in a group depends on when it reaches the committer, which
 * no test controls on a loaded machine. A gate turns the window from a deadline into a minimum: a
 * group whose window has passed stays open until `mayClose()` says so, so a test can hold a group
 * until all its requests are in. The size limits still close a group at once.
 */
export interface GroupGate {
  /** A request joined the open group. */
  joined(): void;
  /** Asked when the window passes, and for every request that joins after it. */
  mayClose(): boolean;
}

/**
 * Collects concurrent requests of this process into groups and writes each group in one
 * transaction. Nothing is answered before its group commits. A group that fails because the
 * database is unavailable fails every one of its requests (the route answers 503 with Retry-After)
 * and stores none of them; any other failure is retried request by request, so a request that
 * breaks the statement fails alone.
 */
export class GroupCommitter {
  private queue: Pending[] = [];
  private queuedReadings = 0;
  private timer: NodeJS.Timeout | undefined;
  private inFlight = 0;
  /** The open group's window has passed and the gate held it open. */
  private held = false;
  /** On a distributed database: organizations by shard group (remembered until a part fails). */
  private router: ShardRouter | undefined;

  constructor(
    private readonly ctx: Pick<Database, 'db' | 'distributed'> & { boss: PgBoss; clock: { now(): Date } },
    private readonly options: GroupCommitOptions,
  ) {}

  submit(request: GroupRequest): Promise<StoreReadingsOutcome> {
    return new Promise((resolve, reject) => {
      this.queue.push({ ...request, resolve, reject });
      this.queuedReadings += request.readings.length;
      this.options.gate?.joined();
      if (this.full()) {
        // A full group goes now, or as soon as a group in flight finishes.
        if (this.inFlight < this.maxInFlight) this.flush();
      } else if (this.held) {
        if (this.options.gate?.mayClose() !== false) this.flush();
      } else if (!this.timer && this.inFlight < this.maxInFlight) {
        this.timer = setTimeout(() => this.windowPassed(), this.options.windowMs);
      }
      // Otherwise every slot is busy: the request waits for the next group (written when one ends).
    });
  }

  private get maxInFlight(): number {
    return this.options.maxInFlight ?? Number.POSITIVE_INFINITY;
  }

  private full(): boolean {
    return this.queue.length >= this.options.maxRequests || this.queuedReadings >= this.options.maxReadings;
  }

  private windowPassed(): void {
    this.timer = undefined;
    if (this.options.gate?.mayClose() === false) this.held = true;
    else this.flush();
  }

  private flush(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    // Every slot busy: the queue goes as the next group when one finishes.
    if (this.queue.length === 0 || this.inFlight >= this.maxInFlight) return;
    this.held = false;
    // Oldest first, at most one group's worth.
    let take = 0;
    let readings = 0;
    while (
      take < this.queue.length &&
      take < this.options.maxRequests &&
      (take === 0 || readings + this.queue[take]!.readings.length <= this.options.maxReadings)
    ) {
      readings += this.queue[take]!.readings.length;
      take++;
    }
    const group = this.queue.slice(0, take);
    this.queue = this.queue.slice(take);
    this.queuedReadings -= readings;
    this.inFlight++;
    void this.write(group).finally(() => {
      this.inFlight--;
      // Requests that arrived while every slot was busy have waited a group's time already; a
      // request that found a free slot has its own window running (the timer). A gate may still
      // hold them (tests).
      if (this.full()) this.flush();
      else if (!this.timer && this.queue.length > 0) {
        if (this.options.gate?.mayClose() === false) this.held = true;
        else this.flush();
      }
    });
    // A burst larger than one group: the next full group goes too while slots are free.
    if (this.full()) this.flush();
  }

  private async write(group: Pending[]): Promise<void> {
    const now = this.ctx.clock.now();
    let distributed: boolean;
    try {
      distributed = await this.ctx.distributed();
    } catch (err) {
      for (const p of group) p.reject(err);
      return;
    }
    if (distributed) return this.writeRouted(group, now);
    const { db, boss } = this.ctx;
    try {
      const outcomes = await retryRolledBack(() =>
        db.transaction().execute((trx) => storeGroup(trx, boss, group, now)),
      );
      for (const [i, p] of group.entries()) p.resolve(outcomes[i]!);
    } catch (err) {
      // `meterbox citus distribute` may have committed since this process last looked (a running
      // database moved onto a cluster): the single-node statement can fail there, as a corrupt
      // intermediate result. Nothing of the group was stored; if the database is distributed
      // now, the group is written again in the Citus shape instead of failing its requests.
      // Not when the database is unavailable: asking would wait on the pool again (a dead connection's
      // deadline) and could not change the answer.
      if (!isDatabaseUnavailable(err) && (await this.ctx.distributed({ recheck: true }).catch(() => false)))
        return this.writeRouted(group, now);
      await this.alone(group, err, (trx, p) => storeRequest(trx, boss, p, now));
    }
  }

  /**
   * A distributed database: the group split by shard group, each part written in a transaction of its
   * own with router statements (storeShardGroup), the parts concurrently. A part touches one node, so
   * parts never wait on each other and no commit spans two nodes; a request is one organization's, so
   * each keeps its all-or-nothing answer.
   */
  private async writeRouted(group: Pending[], now: Date): Promise<void> {
    const { db, boss } = this.ctx;
    let parts: Pending[][];
    try {
      this.router ??= citusRouter(db);
      const shardGroups = await this.router.groups(group.map((p) => p.organizationId));
      parts = shardGroups.map((orgs) => {
        const members = new Set(orgs);
        return group.filter((p) => members.has(p.organizationId));
      });
    } catch (err) {
      for (const p of group) p.reject(err);
      return;
    }
    await Promise.all(
      parts.map(async (part) => {
        try {
          const outcomes = await retryRolledBack(() =>
            db.transaction().execute((trx) => storeShardGroup(trx, boss, part, now)),
          );
          for (const [i, p] of part.entries()) p.resolve(outcomes[i]!);
        } catch (err) {
          // The shard map is read again for the next group: a shard split since it was read puts a
          // part over two shard groups, which Citus may refuse (its requests written alone still pass).
          this.router = undefined;
          await this.alone(part, err, (trx, p) => storeRequest(trx, boss, p, now, true));
        }
      }),
    );
  }

  /**
   * After a group's write failed: a lone request, or a database that is unavailable, fails (the route
   * answers 503 with Retry-After, nothing was stored); otherwise something in the group broke the
   * statement, and each request is written alone so only the request that causes it fails.
   */
  private async alone(
    group: Pending[],
    err: unknown,
    store: (trx: Transaction<DB>, p: Pending) => Promise<StoreReadingsOutcome>,
  ): Promise<void> {
    if (group.length === 1 || isDatabaseUnavailable(err)) {
      for (const p of group) p.reject(err);
      return;
    }
    await Promise.all(
      group.map(async (p) => {
        try {
          p.resolve(await this.ctx.db.transaction().execute((trx) => store(trx, p)));
        } catch (single) {
          p.reject(single);
        }
      }),
    );
  }
}
