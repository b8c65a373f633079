// The WAL a bench's cluster has ready, as a deployment's Postgres that has run a while has it.
//
// A fresh cluster has one WAL segment: every 16 MB of WAL the report writes makes Postgres create and
// zero-fill a new segment file, holding the WAL write lock while every commit waits (IO:WalInitWrite,
// then LWLock:WALWrite for the others). A running cluster recycles the segments behind each checkpoint
// into future ones, up to min_wal_size's worth (or more, after a large WAL between two checkpoints), and
// keeps them. So before each scenario the bench gives the cluster the deployment's settings
// (src/db/wal-sizing.ts, compose.yaml), writes min_wal_size's worth of segments and checkpoints: the
// segments such a cluster holds at minute 0, and the checkpoint every running cluster had within
// checkpoint_timeout (the report's first change of each page then carries its full-page image).
// `fresh` leaves a cluster just created as it is (how the runs published before 2026-11-29 were measured).
import type pg from 'pg';
import { RECOMMENDED_WAL_SETTINGS } from '../../src/db/wal-sizing.js';

/** A run's WAL: the deployment's settings and segments, or a cluster just created (Postgres's defaults). */
export type WalSettings = 'deployment' | 'fresh';

export function walSettingsOf(name: string): WalSettings {
  if (name === 'deployment' || name === 'fresh') return name;
  throw new Error(`--wal: deployment or fresh, not ${name}`);
}

export interface WalReady {
  minWalSize: string;
  maxWalSize: string;
  segmentsReady: number;
  seconds: number;
}

/**
 * With `deployment`, applies its settings to the cluster (both reload without a restart), then readies
 * min_wal_size's worth of segments: one small record and a segment switch per segment, then a checkpoint,
 * behind which they are recycled. Returns what is ready and how long it took. `pool` must be a superuser's.
 */
export async function readyWal(pool: pg.Pool, settings: WalSettings): Promise<WalReady> {
  const t0 = Date.now();
  if (settings === 'fresh') return { ...(await current(pool)), seconds: 0 };
  const values = RECOMMENDED_WAL_SETTINGS;
  for (const [name, value] of Object.entries(values))
    await pool.query(`ALTER SYSTEM SET ${name} = '${value}'`);
  await pool.query('SELECT pg_reload_conf()');
  // A reload reaches the checkpointer (which recycles) asynchronously: wait until this session sees it.
  for (let i = 0; i < 50; i++) {
    const { rows } = await pool.query<{ v: string }>(`SELECT current_setting('min_wal_size') AS v`);
    if (rows[0]?.v === values.min_wal_size) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const { rows } = await pool.query<{ n: string }>(
    `SELECT (pg_size_bytes(current_setting('min_wal_size'))
             / pg_size_bytes(current_setting('wal_segment_size')))::text AS n`,
  );
  const segments = Number(rows[0]?.n ?? 0);
  for (let i = 0; i < segments + 1; i++)
    await pool.query(`SELECT pg_logical_emit_message(false, 'meterbox-bench', 'ready'), pg_switch_wal()`);
  await pool.query('CHECKPOINT');
  return { ...(await current(pool)), seconds: Math.round((Date.now() - t0) / 100) / 10 };
}

/** The cluster's WAL sizes and the segments after the one being written. */
async function current(pool: pg.Pool): Promise<Omit<WalReady, 'seconds'>> {
  const { rows } = await pool.query<{ min: string; max: string; ready: string }>(
    `SELECT current_setting('min_wal_size') AS min, current_setting('max_wal_size') AS max,
            (SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'
                AND name > pg_walfile_name(pg_current_wal_lsn()))::text AS ready`,
  );
  const r = rows[0]!;
  return { minWalSize: r.min, maxWalSize: r.max, segmentsReady: Number(r.ready) };
}

/** The WAL position now, for the bytes written between two positions (walBytesBetween). */
export async function walPosition(pool: pg.Pool): Promise<string> {
  const { rows } = await pool.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
  return rows[0]!.lsn;
}

/** WAL bytes written from position `from` to `to` (default: now). */
export async function walBytesBetween(pool: pg.Pool, from: string, to?: string): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    'SELECT pg_wal_lsn_diff(coalesce($2::pg_lsn, pg_current_wal_lsn()), $1::pg_lsn)::text AS n',
    [from, to ?? null],
  );
  return Number(rows[0]?.n ?? 0);
}
