// The ids meterbox gives the pg-boss jobs it inserts itself: ordered by time (UUID version 7, RFC 9562:
// the first 48 bits the Unix time in milliseconds, then the version, 74 random bits and the variant),
// where pg-boss's own default is random (version 4). A job row is written three times (queued, fetched,
// completed) and its state is in the job table's indexes, so none of those updates is HOT: each puts a
// new entry in the primary key (name, id) at the job's id. Random ids spread those entries over the
// whole index, which holds every job kept for JOB_RETENTION_SECONDS (hundreds of thousands on a busy
// platform), and after each checkpoint the first write to each of its pages logs the whole page;
// time-ordered ids keep a moment's jobs on a few neighbouring pages. Measured with pgbench (pg-boss's own
// insert of 16 jobs a transaction, a job table of a million finished jobs, docs/benchmarks.md): 12.6-15.2
// KB of WAL a transaction against 17.9-23.1 KB with random ids when a checkpoint fell in the run.
// The time in an id means nothing to anyone: a skewed clock only places its jobs elsewhere in the index.
import { randomUUID } from 'node:crypto';
import { sql } from 'kysely';

/** A time-ordered job id (version 7) for a job inserted at `nowMs` (this host's clock). */
export function timeOrderedId(nowMs: number = Date.now()): string {
  const time = Math.max(0, Math.floor(nowMs)).toString(16).padStart(12, '0').slice(-12);
  // A version 4 id's random bits and variant, its first 48 bits replaced by the time, its version by 7.
  return `${time.slice(0, 8)}-${time.slice(8, 12)}-7${randomUUID().slice(15)}`;
}

/**
 * timeOrderedId in SQL, for jobs a statement inserts itself (queued-in-statement.ts): the statement's
 * start as the time (the database's clock, as pg-boss stamps created_on), in whole milliseconds (floor:
 * a cast to bigint would round half a millisecond up) as the first 6 bytes, gen_random_uuid()'s other
 * bytes, its version digit (the 13th hex digit) made 7.
 */
export const TIME_ORDERED_ID_SQL = sql`overlay(encode(
    overlay(uuid_send(gen_random_uuid())
            placing substring(int8send(floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint) FROM 3)
            FROM 1 FOR 6), 'hex')
  placing '7' FROM 13 FOR 1)::uuid`;
