// Stripe's v2 meter event stream validates events after accepting them and reports the invalid ones
// later (v1.billing.meter.error_report_triggered): an accepted v2 row stays pending until its validation
// window (DELIVERY_V2_VALIDATION_SECONDS) passes with no error report naming it, then it is delivered.
// The outbox sweep (sweep.ts) runs the promotion on each pass.
import { type Kysely, sql } from 'kysely';
import { readDatabaseTime } from '../db/clock.js';
import type { DB } from '../db/schema.js';

/**
 * v2 rows Stripe accepted more than `windowSeconds` ago with no error report naming them become
 * `delivered` (delivered_at: when Stripe received them): one statement. Returns how many.
 */
export async function promoteValidated(db: Kysely<DB>, windowSeconds: number): Promise<number> {
  // The instants are parameters, not now(): Citus refuses a function over time in an UPDATE of a
  // distributed table. They are the database's clock, read first: a worker's clock 20 minutes ahead
  // would promote rows before Stripe's error reports on them could arrive.
  const now = await readDatabaseTime(db)();
  const before = new Date(now.getTime() - windowSeconds * 1000);
  // Found through meter_outbox_identified_pending (migrations/0085): a row is accepted after its
  // identifier was committed, so every row due was identified before the window's start too. No index
  // names accepted_at, so the settle that sets it can be a HOT update. The comparison of the instant
  // (a strict operator) is what lets the planner use that index, whose predicate names the instant.
  const due = sql`status = 'pending' AND identifier IS NOT NULL AND coalesce(identified_at, created_at) < ${before}
       AND accepted_at IS NOT NULL AND accepted_at < ${before}`;
  // A look first (no lock): the UPDATE, which on Citus is a write on every shard, runs only when some
  // row is due (never with v1).
  const any = await sql`SELECT 1 FROM meter_outbox WHERE ${due} LIMIT 1`.execute(db);
  if (any.rows.length === 0) return 0;
  const result = await sql`
    UPDATE meter_outbox SET status = 'delivered', delivered_at = accepted_at, updated_at = ${now}
     WHERE ${due}`.execute(db);
  return Number(result.numAffectedRows ?? 0n);
}
