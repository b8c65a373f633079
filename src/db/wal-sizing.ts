// Whether the database's WAL settings fit the hourly report. At minute 0 the report writes every billable
// organization's row, key row and job and delivers them: about REPORT_WAL_BYTES_PER_ORGANIZATION of WAL
// each within a minute (docs/benchmarks.md). Postgres writes WAL into 16 MB segment files; one it must
// create is zero-filled while it holds the WAL write lock, and every commit (the API's readings too)
// waits for it. A running cluster recycles the segments behind each checkpoint into future ones, up to
// min_wal_size's worth (and its recent checkpoints' distance): below the report's WAL, the report creates
// the rest while requests wait on them. And WAL past max_wal_size / (1 + checkpoint_completion_target)
// since the last checkpoint requests another in the middle of the report, after which each page's first
// change writes a full-page image. The worker says so at start-up and `meterbox wal check` on demand
// (src/metering/wal-report.ts; docs/operations.md, "Postgres's WAL settings"); compose.yaml's Postgres runs
// with RECOMMENDED_WAL_SETTINGS.
import { type Kysely, sql } from 'kysely';
import { BILLABLE_STATUSES, type DB } from './schema.js';

/**
 * WAL an organization's hourly report writes, rounded up: its outbox row, key row and pg-boss job
 * written and delivered, with the indexes (measured 5,600-6,100 bytes at 100,000 organizations on v2;
 * Metronome's longer keys write about a fifth more, docs/benchmarks.md). An organization in a parallel
 * run of two destinations writes it twice; the rounding covers a few of them, not all.
 */
export const REPORT_WAL_BYTES_PER_ORGANIZATION = 8_000;

/** compose.yaml's Postgres settings: ready for a report of up to 100,000 organizations. */
export const RECOMMENDED_WAL_SETTINGS = { min_wal_size: '1GB', max_wal_size: '4GB' } as const;

export interface WalSettings {
  minWalBytes: number;
  maxWalBytes: number;
  checkpointCompletionTarget: number;
  /** wal_init_zero: a new segment is zero-filled (off on copy-on-write file systems). */
  initZero: boolean;
  /** wal_recycle: old segments are renamed into future ones (off: removed, every segment created). */
  recycle: boolean;
}

export async function readWalSizing(
  db: Kysely<DB>,
): Promise<{ settings: WalSettings; organizations: number }> {
  const { rows } = await sql<{
    min_wal: string;
    max_wal: string;
    target: string;
    init_zero: string;
    recycle: string;
    organizations: string;
  }>`
    SELECT pg_size_bytes(current_setting('min_wal_size'))::text AS min_wal,
           pg_size_bytes(current_setting('max_wal_size'))::text AS max_wal,
           current_setting('checkpoint_completion_target') AS target,
           current_setting('wal_init_zero') AS init_zero,
           current_setting('wal_recycle') AS recycle,
           -- One subscription an organization (its primary key).
           (SELECT count(*) FROM subscriptions
             WHERE status = ANY(${[...BILLABLE_STATUSES]}::text[]))::text AS organizations`.execute(db);
  const r = rows[0]!;
  return {
    settings: {
      minWalBytes: Number(r.min_wal),
      maxWalBytes: Number(r.max_wal),
      checkpointCompletionTarget: Number(r.target),
      initZero: r.init_zero === 'on',
      recycle: r.recycle === 'on',
    },
    organizations: Number(r.organizations),
  };
}

const MB = 1024 * 1024;
const mb = (bytes: number) => `${Math.ceil(bytes / MB)} MB`;

/** What the settings mean for a report of `organizations`: ok, or a line per setting to raise. */
export function describeWalSizing(
  settings: WalSettings,
  organizations: number,
): { ok: boolean; reportWalBytes: number; lines: string[] } {
  const reportWalBytes = organizations * REPORT_WAL_BYTES_PER_ORGANIZATION;
  const lines: string[] = [];
  if (settings.initZero && !settings.recycle)
    lines.push(
      `wal_recycle is off and wal_init_zero on: every 16 MB of WAL the report writes (about ${mb(reportWalBytes)}) is a new segment zero-filled while commits wait; turn wal_init_zero off too (as on copy-on-write file systems) or wal_recycle on`,
    );
  else if (settings.initZero && settings.minWalBytes < reportWalBytes)
    lines.push(
      `min_wal_size ${mb(settings.minWalBytes)} is below the hourly report's WAL for ${organizations} organizations (about ${mb(reportWalBytes)}): the segments past it may be created during the report, each zero-filled while commits wait; set min_wal_size to at least ${mb(reportWalBytes)}`,
    );
  const checkpointAfter = settings.maxWalBytes / (1 + settings.checkpointCompletionTarget);
  if (checkpointAfter < reportWalBytes)
    lines.push(
      `max_wal_size ${mb(settings.maxWalBytes)} requests a checkpoint after about ${mb(checkpointAfter)} of WAL, less than the hourly report's (about ${mb(reportWalBytes)}): a checkpoint in the middle of the report, then full-page images; set max_wal_size to at least ${mb(reportWalBytes * (1 + settings.checkpointCompletionTarget))}`,
    );
  return { ok: lines.length === 0, reportWalBytes, lines };
}
