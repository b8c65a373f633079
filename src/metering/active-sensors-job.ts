// The hourly active_sensors report: a pg-boss cron (METER_CRON, UTC) plus a run at worker start-up,
// each reporting every billable organization once for one UTC hour (see reportActiveSensorsForHour).
import type { Kysely } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import { eventsPerSecondAt, metronomeBudget, stripeBudget } from '../billing/limits.js';
import { type Config, ConfigError } from '../config.js';
import type { Context } from '../context-type.js';
import { longStatements } from '../db/dead-connections.js';
import type { DB } from '../db/schema.js';
import { analyzeStale, JOB_TABLE } from '../db/statistics.js';
import type { Logger } from '../log.js';
import {
  type HourlyReportResult,
  type ReportedCountsHook,
  reportActiveSensorsChunk,
  utcHourOf,
} from './active-sensors.js';
import { METRONOME_MAX_EVENTS } from './metronome.js';
import { queues, sendJob } from './queues.js';
import { recordTaskFailure, recordTaskSuccess } from './task-runs.js';
import { MAX_STREAM_EVENTS } from './transport-v2.js';
import { reportWalSizing } from './wal-report.js';

export const ACTIVE_SENSORS_QUEUE = 'active-sensors-report';

/**
 * How early a cron job may be created before the occurrence it stands for. pg-boss judges an
 * occurrence due against its cached reading of the database clock, so a host clock that stepped
 * forward since the last reading can create the 01:00 job at 00:59:59; without this margin that job
 * would be read as hour 00's and hour 01 would go unreported. Small enough that a report is never
 * timestamped more than this ahead of its creation (Stripe accepts up to 5 minutes).
 */
export const CRON_EARLY_TOLERANCE_MS = 30_000;

/**
 * The hour a job reports. pg-boss cron jobs carry only the schedule's static data, not the
 * occurrence they were created for; their createdOn is set from the database clock when the
 * occurrence is forwarded (within about a minute of it) and is kept across retries, so a retry or a
 * backlog drained later still reports the hour the job was created for, not the hour it ran in.
 */
export function scheduledHourOf(createdOn: Date): Date {
  return utcHourOf(new Date(createdOn.getTime() + CRON_EARLY_TOLERANCE_MS));
}

/** How the worker's runs go: organizations per chunk (one transaction each) and per second. */
export interface ReportPacing {
  chunkSize: number;
  /**
   * Most organizations' rows written per second; 0 = chunks back to back. Organizations already
   * reported for the hour (a restarted worker's start-up run) are passed over without waiting.
   */
  organizationsPerSecond: number;
}

export const DEFAULT_REPORT_PACING: ReportPacing = { chunkSize: 1_000, organizationsPerSecond: 5_000 };

/**
 * One run for one hour, chunk by chunk (reportActiveSensorsChunk): each chunk's rows and delivery
 * jobs commit together in a short transaction, and delivery starts on the first chunk while the
 * next is written. Paced so a run of 100,000 organizations neither holds one long transaction (its
 * 100,000 row locks, its WAL, its commit) nor lands 100,000 jobs on the queue in one instant, while
 * the API writes readings on the same cores. The hour's identifiers make spreading safe: a chunk
 * written late reports the same hour, once per organization.
 */
export async function runHourlyReport(
  db: Kysely<DB>,
  boss: PgBoss,
  hour: Date,
  log: Logger,
  distributed = false,
  pacing: ReportPacing = DEFAULT_REPORT_PACING,
  /** The active_sensors threshold alerts, in each chunk's transaction (ReportedCountsHook). */
  onCounts?: ReportedCountsHook,
): Promise<HourlyReportResult> {
  const reportHour = utcHourOf(hour);
  const started = Date.now();
  let reported = 0;
  let after: string | null = null;
  // When the next chunk may start: each chunk's written rows move it on by their share of the pace,
  // counted from that chunk's start, so a stretch of organizations already reported neither waits nor
  // earns a burst afterwards.
  let due = started;
  try {
    for (;;) {
      const from: string | null = after;
      const chunkStarted = Date.now();
      // A chunk counts the sensors of thousands of organizations: the worker's long deadline.
      const chunk = await longStatements(() =>
        db.transaction().execute(async (trx) => {
          const written = await reportActiveSensorsChunk(
            trx,
            boss,
            reportHour,
            { after: from, limit: pacing.chunkSize },
            { distributed, ...(onCounts ? { onCounts } : {}) },
          );
          // Recorded with the last chunk: the run counts as a success only once every chunk committed.
          if (written.done) await recordTaskSuccess(trx, 'active_sensors');
          return written;
        }),
      );
      reported += chunk.reported;
      await refreshStatistics(db, log);
      if (chunk.done || chunk.last === null) break;
      after = chunk.last;
      if (pacing.organizationsPerSecond > 0) {
        // Host time on purpose: pacing spaces this process's own writes, nothing is judged by it.
        due = Math.max(due, chunkStarted) + (chunk.reported * 1000) / pacing.organizationsPerSecond;
        const wait = due - Date.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  } catch (err) {
    await recordTaskFailure(db, 'active_sensors', err).catch((recordErr: unknown) =>
      log.warn({ err: recordErr }, 'active-sensor report failure not recorded'),
    );
    throw err;
  }
  log.info(
    { hour: reportHour.toISOString(), reported, ms: Date.now() - started },
    'active-sensor report written',
  );
  return { hour: reportHour, reported };
}

/**
 * The tables a report grows: the delivery jobs it queues (pg-boss's job table), the key rows of first
 * reports and the outbox. Their statistics are refreshed between chunks once they are stale
 * (src/db/statistics.ts), so the requests and the delivery that run beside the report are planned on
 * what the tables hold now. On Citus the distributed tables' statistics are the nodes' own.
 */
const REPORT_TABLES = [JOB_TABLE, 'meter_delivery_keys', 'meter_outbox'] as const;

async function refreshStatistics(db: Kysely<DB>, log: Logger): Promise<void> {
  const analyzed = await longStatements(() => analyzeStale(db, REPORT_TABLES)).catch((err: unknown) => {
    // Statistics help plans; a report does not wait on them or fail for them.
    log.warn({ err }, 'statistics of the report tables not refreshed');
    return [];
  });
  if (analyzed.length > 0) log.debug({ analyzed }, 'report tables analyzed');
}

/** The report's pace when ACTIVE_SENSORS_PER_SECOND is unset never goes below or above these. */
export const REPORT_PACE_BOUNDS = { min: 1_000, max: 5_000 } as const;

/**
 * Organizations the report writes per second: ACTIVE_SENSORS_PER_SECOND, or when unset the events per
 * second the default destination's call budget delivers (v1: one event a call; the v2 stream and
 * Metronome: up to 100), within REPORT_PACE_BOUNDS. Writing faster than delivery takes the rows only
 * makes a backlog whose claims compete with ingestion for the database's cores: at 10,000 organizations
 * on v1 live (800 calls/s), writing 1,000 a second instead of 5,000 finished the report sooner in every
 * run and lowered the request path's median p99 (docs/benchmarks.md). The floor keeps a sandbox's
 * 25 calls/s from stretching 100,000 organizations over an hour.
 */
export function reportPace(
  config: Pick<
    Config,
    | 'ACTIVE_SENSORS_PER_SECOND'
    | 'DEFAULT_DESTINATION'
    | 'DELIVERY_TRANSPORT'
    | 'METRONOME_MAX_CALLS_PER_SECOND'
    | 'METRONOME_MAX_EVENTS_PER_SECOND'
    | 'STRIPE_MAX_CALLS_PER_SECOND'
    | 'STRIPE_MAX_EVENTS_PER_SECOND'
    | 'STRIPE_SECRET_KEY'
  >,
): number {
  if (config.ACTIVE_SENSORS_PER_SECOND !== undefined) return config.ACTIVE_SENSORS_PER_SECOND;
  const eventsPerSecond =
    config.DEFAULT_DESTINATION === 'metronome'
      ? eventsPerSecondAt(metronomeBudget(config), METRONOME_MAX_EVENTS)
      : eventsPerSecondAt(stripeBudget(config), config.DELIVERY_TRANSPORT === 'v2' ? MAX_STREAM_EVENTS : 1);
  return Math.min(REPORT_PACE_BOUNDS.max, Math.max(REPORT_PACE_BOUNDS.min, eventsPerSecond));
}

/**
 * Registers the report's job handler and schedule, then reports the current hour for every
 * billable organization that has no report for it yet. Safe to run in every worker process.
 */
export async function startActiveSensorReporting(ctx: Context, onCounts?: ReportedCountsHook): Promise<void> {
  const log = ctx.log.child({ component: 'active-sensors', queue: ACTIVE_SENSORS_QUEUE });
  const pacing: ReportPacing = {
    chunkSize: ctx.config.ACTIVE_SENSORS_CHUNK_SIZE,
    organizationsPerSecond: reportPace(ctx.config),
  };
  await registerSchedule(ctx.boss, ctx.config.METER_CRON, log);
  // On one node the report's WAL is this database's (on Citus the worker nodes write it).
  if (!(await ctx.distributed())) await reportWalSizing(ctx.db, log);

  await ctx.boss.work(
    ACTIVE_SENSORS_QUEUE,
    { includeMetadata: true, batchSize: 1 },
    async (jobs: JobWithMetadata<object>[]) => {
      for (const job of jobs) {
        queues[ACTIVE_SENSORS_QUEUE].payload.parse(job.data);
        await runHourlyReport(
          ctx.db,
          ctx.boss,
          scheduledHourOf(job.createdOn),
          log.child({ jobId: job.id }),
          await ctx.distributed(),
          pacing,
          onCounts,
        );
      }
    },
  );

  const now = ctx.clock.now();
  try {
    await runHourlyReport(
      ctx.db,
      ctx.boss,
      now,
      log.child({ trigger: 'start-up' }),
      await ctx.distributed(),
      pacing,
      onCounts,
    );
  } catch (err) {
    // Not worth failing the worker over: the same report queued as a job gets the queue's retries.
    log.warn({ err }, 'start-up active-sensor report failed; queued for retry');
    await sendJob(ctx.boss, ACTIVE_SENSORS_QUEUE, {});
  }
}

/**
 * Upserts the one schedule of the queue (pg-boss keys schedules by queue name and key, so calling
 * this on every start rewrites the same row and a changed METER_CRON replaces the old expression),
 * and removes schedules under any other key, which would fire the report a second time.
 */
export async function registerSchedule(boss: PgBoss, cron: string, log: Logger): Promise<void> {
  try {
    // The config schema checks only the shape; pg-boss's own parser, the one schedule() and the
    // cron pass use, judges a value like "99 * * * *". Fail start-up naming the variable.
    boss.previewSchedule(cron, { tz: 'UTC', count: 1 });
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new ConfigError([
      { variable: 'METER_CRON', message: `is not a valid cron expression (${reason})` },
    ]);
  }
  await boss.schedule(ACTIVE_SENSORS_QUEUE, cron, {}, { tz: 'UTC' });
  for (const stale of await boss.getSchedules(ACTIVE_SENSORS_QUEUE)) {
    if (stale.key !== '') await boss.unschedule(ACTIVE_SENSORS_QUEUE, stale.key);
  }
  log.info({ cron, tz: 'UTC' }, 'active-sensor report scheduled');
}
