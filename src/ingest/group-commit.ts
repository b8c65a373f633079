// Group commit for POST /v1/readings: concurrent requests of one API process are written together
// in ONE transaction, so a single-reading request no longer pays a whole transaction (round trips,
// commit, WAL flush) of its own. Every request keeps its own answer: inserted/duplicates, or its own 422
// problems (one request's unknown sensor never rejects another). The group goes to the writer of the
// database's shape: one statement on one node (with INGEST_GROUP_ONE_STATEMENT=on, the default,
// single-node.ts storeGroupAtOnce in autocommit, else or when it refuses storeGroup in a transaction), or a transaction of router statements per shard group on
// Citus (routed.ts storeShardGroup); both keep ingestion's contract (readings.ts; its cases:
// test/ingest/contract.ts).
import type { Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Database } from '../db/database.js';
import { isDatabaseUnavailable, retryRolledBack } from '../db/errors.js';
import type { DB } from '../db/schema.js';
import { citusRouter, type ShardRouter } from '../metering/delivery-sql-shapes.js';
import { type DeliveryWake, deliveryWake } from './delivery-wake.js';
import { type JobStatistics, jobStatistics } from './job-statistics.js';
import type { GroupRequest, StoreReadingsOutcome } from './readings.js';
import { AnswerCommittedMeanwhile, storeKeyedShardGroup, storeShardGroup } from './routed.js';
import { type GroupWritten, storeGroup, storeGroupOnOneNode } from './single-node.js';

export type { GroupRequest } from './readings.js';

/**
 * A keyed request (GroupRequest.answer) the committer did not write: its key holds a live answer (the
 * route replays it), or its group went to a transaction, which stores no answer, or failed (the route
 * writes it alone). Nothing of it is stored.
 */
export class WriteAlone extends Error {}

interface Pending extends GroupRequest {
  resolve(outcome: StoreReadingsOutcome): void;
  reject(err: unknown): void;
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

export type { GroupWritten } from './single-node.js';

/**
 * When a group goes. `window` (a committer's default): the first request of every group waits the
 * window for others, even alone. `adaptive` (INGEST_GROUP_FLUSH's default): a request that is the only
 * one a quiet process is handling (none queued, none being written, none on its way: see `started` and
 * soleRequest) is written at once, so a lone request waits for nothing; otherwise the window rule. Level
 * with the window under concurrent load once groups became one statement, and a lone client's requests
 * twice as fast (docs/benchmarks.md). (Sending the requests that gathered as soon as a group ends,
 * rather than at their window, made groups smaller and cost a third of the throughput at 16 clients.)
 */
export type GroupFlush = 'adaptive' | 'window';

export interface GroupCommitOptions {
  /**
   * How long the first request of a group waits for others (ms); with `flush: 'adaptive'` a request
   * the process handles alone does not wait.
   */
  windowMs: number;
  /** When a group goes (default `window`; the process's setting defaults to `adaptive`; see GroupFlush). */
  flush?: GroupFlush;
  /**
   * On one node, each group first as ONE statement in autocommit (storeGroupThenInTransaction;
   * INGEST_GROUP_ONE_STATEMENT); otherwise every group in a transaction (storeGroup).
   */
  oneStatement?: boolean;
  /** Most requests in one group. */
  maxRequests: number;
  /** Most readings in one group (a request with that many is a group alone, written at once). */
  maxReadings: number;
  /**
   * Most groups being written at once. While that many are in flight, new requests wait together
   * and go as the next group as soon as one finishes: under load, groups grow instead of commits
   * multiplying. Every group's commit waits for the WAL flush: more groups at once only queue there.
   */
  maxInFlight?: number;
  /** A test seam (see GroupGate); production runs without one. */
  gate?: GroupGate;
  /** Wakes the delivery workers after a group statement queued a job (default: deliveryWake of the database). */
  wake?: DeliveryWake;
  /** Told how many jobs a committed group statement queued (default: jobStatistics of the database). */
  jobsQueued?: JobStatistics;
  /** Told how each group (each part, on Citus) that stored was written: the API's metric. */
  onGroup?: (written: GroupWritten) => void;
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
  /** Requests of this process between their arrival and their answer (see `started`). */
  private requests = 0;
  /** No two requests handled at once since a request alone in the process was written (soleRequest). */
  private quiet = true;
  /** A sole request's check after this turn of the event loop (aloneSoon). */
  private aloneCheck: NodeJS.Immediate | undefined;
  /** The open group's window has passed and the gate held it open. */
  private held = false;
  /** On a distributed database: organizations by shard group (remembered until a part fails). */
  private router: ShardRouter | undefined;

  private readonly wake: DeliveryWake;
  private readonly jobsQueued: JobStatistics;

  constructor(
    private readonly ctx: Pick<Database, 'db' | 'distributed'> & { boss: PgBoss; clock: { now(): Date } },
    private readonly options: GroupCommitOptions,
  ) {
    this.wake = options.wake ?? deliveryWake(ctx.db);
    this.jobsQueued = options.jobsQueued ?? jobStatistics(ctx.db);
  }

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
      } else if (this.soleRequest()) {
        this.aloneSoon();
      } else if (!this.timer && this.inFlight < this.maxInFlight) {
        this.timer = setTimeout(() => this.windowPassed(), this.options.windowMs);
      }
      // Otherwise every slot is busy: the request waits for the next group (written when one ends).
    });
  }

  /**
   * A request arrived (the route calls this first, before authentication and its body) and is handled until the
   * returned call (once it is answered, whether or not it was submitted). With the adaptive flush a
   * request waits for others only while the process handles others: the window is for the requests
   * on their way, and a lone request has none.
   */
  started(): () => void {
    if (++this.requests > 1) this.quiet = false;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.requests--;
      // The request that was on its way ended without joining (refused, answered from a key): the
      // one left waiting is alone now.
      if (this.soleRequest() && !this.held) this.aloneSoon();
    };
  }

  /**
   * The queue's one request is the only one this process handles, nothing is being written, and the
   * process is quiet: it has not handled two requests at once since it last wrote a request that was
   * alone in the process. Under concurrent load a request is often briefly alone between groups;
   * writing it alone there made more, smaller groups (0.78-0.87 of the window rule's throughput at 16
   * clients, measured), so once requests overlap the window rule holds until a lone request is
   * written with nobody else in the process.
   */
  private soleRequest(): boolean {
    return (
      this.adaptive && this.queue.length === 1 && this.inFlight === 0 && this.requests <= 1 && this.quiet
    );
  }

  /**
   * Writes the sole request after the event loop's current turn, unless others arrived in it: the
   * requests whose bytes came in the same poll of the sockets are counted by then (see `started`),
   * so a burst that Node reads one socket at a time still forms one group. Still alone: written
   * now; not alone: the window rule.
   */
  private aloneSoon(): void {
    if (this.aloneCheck) return;
    this.aloneCheck = setImmediate(() => {
      this.aloneCheck = undefined;
      if (this.held || this.queue.length === 0) return;
      if (this.soleRequest()) {
        if (this.options.gate?.mayClose() === false) this.held = true;
        else this.flush();
      } else if (!this.timer && this.inFlight < this.maxInFlight) {
        this.timer = setTimeout(() => this.windowPassed(), this.options.windowMs);
      }
    });
  }

  private get adaptive(): boolean {
    return this.options.flush === 'adaptive';
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
    // Oldest first, at most one group's worth, and one request per Idempotency-Key (the next group
    // takes a second: it replays the first's answer).
    let take = 0;
    let readings = 0;
    const keys = new Set<string>();
    while (
      take < this.queue.length &&
      take < this.options.maxRequests &&
      (take === 0 || readings + this.queue[take]!.readings.length <= this.options.maxReadings)
    ) {
      const { answer, organizationId } = this.queue[take]!;
      const key = answer && `${organizationId} ${answer.key}`;
      if (key && keys.has(key)) break;
      if (key) keys.add(key);
      readings += this.queue[take]!.readings.length;
      take++;
    }
    const group = this.queue.slice(0, take);
    if (take === 1 && this.requests <= 1) this.quiet = true;
    this.queue = this.queue.slice(take);
    this.queuedReadings -= readings;
    this.inFlight++;
    void this.write(group).finally(() => {
      this.inFlight--;
      // Requests that arrived while every slot was busy have waited a group's time already; a
      // request that found a free slot has its own window running (the timer). A gate may still
      // hold them (tests).
      if (this.full()) this.flush();
      else if (this.soleRequest() && !this.held) this.aloneSoon();
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
      const { outcomes, written, queued } = await retryRolledBack(() =>
        storeGroupOnOneNode(db, boss, group, now, this.options.oneStatement ?? false),
      );
      // A group of keyed requests its statement refused stored nothing (the route writes them alone).
      if (outcomes.some((o) => o)) this.options.onGroup?.(written);
      // Its jobs are committed: the workers are woken (delivery-wake.ts; a transaction's insert NOTIFYs
      // itself), and the job table's statistics follow its growth (job-statistics.ts).
      if (queued.jobs + queued.batchJobs > 0) {
        this.wake(queued);
        this.jobsQueued(queued.jobs + queued.batchJobs);
      }
      for (const [i, p] of group.entries()) {
        const outcome = outcomes[i];
        if (outcome) p.resolve(outcome);
        else p.reject(new WriteAlone());
      }
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
   * own with router statements (storeKeyedShardGroup, which also stores the part's keyed requests'
   * answers), the parts concurrently. A part touches one node, so parts never wait on each other and no
   * commit spans two nodes; a request is one organization's, so each keeps its all-or-nothing answer.
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
          const write = () =>
            retryRolledBack(() =>
              db.transaction().execute((trx) => storeKeyedShardGroup(trx, boss, part, now)),
            );
          // An answer committed meanwhile for one of the part's keys: the part is written again, and its
          // look-up now finds that key taken.
          const outcomes = await write().catch((err: unknown) => {
            if (err instanceof AnswerCommittedMeanwhile) return write();
            throw err;
          });
          if (outcomes.some((o) => o)) this.options.onGroup?.('routed');
          for (const [i, p] of part.entries()) {
            const outcome = outcomes[i];
            if (outcome) p.resolve(outcome);
            else p.reject(new WriteAlone());
          }
        } catch (err) {
          // The shard map is read again for the next group: a shard split since it was read puts a
          // part over two shard groups, which Citus may refuse (its requests written alone still pass).
          // (An answer committed meanwhile for one of the part's keys changed no shard.)
          if (!(err instanceof AnswerCommittedMeanwhile)) this.router = undefined;
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
      for (const p of group) p.reject(p.answer && !isDatabaseUnavailable(err) ? new WriteAlone() : err);
      return;
    }
    await Promise.all(
      group.map(async (p) => {
        if (p.answer) return p.reject(new WriteAlone());
        try {
          p.resolve(await this.ctx.db.transaction().execute((trx) => store(trx, p)));
        } catch (single) {
          p.reject(single);
        }
      }),
    );
  }
}
