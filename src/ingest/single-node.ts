// Ingestion on one node: a group of requests (group-commit.ts) written in ONE statement, in autocommit
// with the new keys' jobs queued by the statement itself (storeGroupAtOnce), or in a transaction with
// the hand-off after it (storeGroup). The contract holds per transaction: one meter_outbox row per
// billable organization and destination in force (organization_destinations, read in the same
// statement), its value the rows that organization inserted, each of those readings naming the billing
// one (outbox_id; the others mirror it), and the delivery hand-off once per transaction and delivery key
// (readings.ts; its cases: test/ingest/contract.ts). A distributed database takes routed.ts's router
// statements instead.
import type { Kysely, Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { writeCrossings } from '../alerts/thresholds.js';
import { sqlState } from '../db/errors.js';
import type { DB } from '../db/schema.js';
import { enqueueDeliveries } from '../metering/outbox.js';
import type { QueuedJobs } from './delivery-wake.js';
import { groupStatement, readRows, type StatementShape } from './group-statement.js';
import type { KeyedAnswer } from './idempotency.js';
import { REGROUP_STATE } from './queued-in-statement.js';
import {
  type GroupRequest,
  groupOutcomes,
  problemsByRequest,
  type StoreReadingsOutcome,
} from './readings.js';

/**
 * Writes a group of validated requests in the caller's transaction with one statement, then hands
 * the new outbox rows to delivery (once per delivery key). The statement also share-locks the keys'
 * already queued delivery jobs (lockQueuedDeliveries), so in the steady state, where every key has
 * one, a group is BEGIN, one statement and COMMIT. With INGEST_GROUP_ONE_STATEMENT=on the group committer first
 * tries storeGroupAtOnce (one statement, no transaction of its own) and comes here when that one refused. Rows are inserted in (sensor, instant)
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
  shape: StatementShape = 'auto',
): Promise<StoreReadingsOutcome[]> {
  // Its statement stores no answer: a keyed request here would be written and its key left free.
  if (requests.some((r) => r.answer)) throw new Error('storeGroup writes no keyed request');
  const { statement, offsets } = groupStatement(requests, now, false, shape);
  const found = readRows((await statement.execute(trx)).rows);
  await enqueueDeliveries(trx, boss, found.customers, found.held);
  if (found.crossings.length > 0) await writeCrossings(trx, boss, found.crossings, now);
  return groupOutcomes(requests, problemsByRequest(found.problemRows, offsets), found.inserted);
}

/**
 * storeGroup as ONE statement in autocommit, its own transaction: the statement also inserts the new
 * keys' delivery jobs (queued-in-statement.ts) and the answers of the group's keyed requests, so a group
 * is one round trip where storeGroup's is four (BEGIN, the statement, pg-boss's insert, COMMIT). A keyed
 * request whose key holds a live answer stores nothing: its outcome is null (the caller replays that
 * answer). When the group needs more than one statement (a new key's job refused by a concurrent one, a
 * threshold crossed, an answer for one of its keys committed while it ran) it fails with REGROUP_STATE
 * and stores nothing: the caller writes it with storeGroup in a transaction.
 */
export async function storeGroupAtOnce(
  db: Kysely<DB>,
  requests: readonly GroupRequest[],
  now: Date,
  shape: StatementShape = 'auto',
): Promise<{ outcomes: (StoreReadingsOutcome | null)[]; queued: QueuedJobs }> {
  const { statement, offsets } = groupStatement(requests, now, true, shape);
  const found = readRows((await statement.execute(db)).rows);
  const outcomes = groupOutcomes(requests, problemsByRequest(found.problemRows, offsets), found.inserted);
  return { outcomes: outcomes.map((o, req) => (found.taken.has(req) ? null : o)), queued: found.queued };
}

/**
 * A request with an Idempotency-Key as ONE statement in autocommit: storeGroupAtOnce's statement for a
 * group of one that also stores the request's answer (201 and its counts; nothing when the request is
 * refused), so the answer commits with the readings as in the transaction path, in one round trip
 * instead of four (BEGIN, the statement, the answer's insert, COMMIT). Null when the statement refused and
 * stored nothing: a live answer for the key exists (a concurrent request with the key committed first),
 * a new key's job was refused or a threshold crossed; the caller writes the request in a transaction.
 * (With group commit, keyed requests are written in groups: storeGroupOnOneNode.)
 */
export async function storeKeyedAtOnce(
  db: Kysely<DB>,
  request: GroupRequest,
  now: Date,
  answer: KeyedAnswer,
): Promise<{ outcome: StoreReadingsOutcome; queued: QueuedJobs } | null> {
  try {
    const { outcomes, queued } = await storeGroupAtOnce(db, [{ ...request, answer }], now);
    return outcomes[0] ? { outcome: outcomes[0], queued } : null;
  } catch (err) {
    if (sqlState(err) !== REGROUP_STATE) throw err;
    return null;
  }
}

/** How a group that stored was written: meterbox_ingest_groups_total's `written` (docs/operations.md). */
export type GroupWritten = 'one_statement' | 'regrouped' | 'transaction' | 'routed';

/**
 * A group on one node: with `oneStatement`, ONE statement in autocommit (storeGroupAtOnce, one round
 * trip), or, when the group needs more than one statement (that statement refused to commit alone and
 * stored nothing), storeGroup's transaction; without, storeGroup's transaction. A keyed request is written
 * only by the one statement, which stores its answer: in the transaction its outcome is null, not
 * written (the caller writes it alone, storing its answer or replaying the one stored). `queued`: the
 * delivery jobs the one statement queued, whose workers the caller wakes (delivery-wake.ts); a
 * transaction's insert wakes them itself.
 */
export async function storeGroupOnOneNode(
  db: Kysely<DB>,
  boss: PgBoss,
  group: readonly GroupRequest[],
  now: Date,
  oneStatement: boolean,
): Promise<{ outcomes: (StoreReadingsOutcome | null)[]; written: GroupWritten; queued: QueuedJobs }> {
  const inTransaction = async (written: GroupWritten) => {
    const unkeyed = group.filter((r) => !r.answer);
    const stored =
      unkeyed.length > 0 ? await db.transaction().execute((trx) => storeGroup(trx, boss, unkeyed, now)) : [];
    let next = 0;
    return {
      outcomes: group.map((r) => (r.answer ? null : stored[next++]!)),
      written,
      queued: { jobs: 0, batchJobs: 0 },
    };
  };
  if (!oneStatement) return inTransaction('transaction');
  try {
    return { ...(await storeGroupAtOnce(db, group, now)), written: 'one_statement' };
  } catch (err) {
    if (sqlState(err) !== REGROUP_STATE) throw err;
    return inTransaction('regrouped');
  }
}
