// Silence alerts: an organization that stored readings within ALERT_SILENCE_LOOKBACK_HOURS and none
// for ALERT_SILENCE_AFTER_MINUTES gets one `organization.silent` event; its next reading, one
// `organization.resumed`. Decided on the database's clock (now()), so hosts whose clocks differ agree.
// "Once" is the silence_state row: a conditional insert starts a silence, a delete ends it, each in
// the transaction that writes its event.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import { writeAlertEvents } from './events.js';

export interface SilencePass {
  silent: string[];
  resumed: string[];
  /** Organizations silent after the pass. */
  silentNow: number;
}

export async function silencePass(
  db: Kysely<DB>,
  boss: PgBoss,
  config: Pick<Config, 'ALERT_SILENCE_LOOKBACK_HOURS' | 'ALERT_SILENCE_AFTER_MINUTES'>,
): Promise<SilencePass> {
  if (config.ALERT_SILENCE_AFTER_MINUTES === 0) return { silent: [], resumed: [], silentNow: 0 };
  return db.transaction().execute(async (trx) => {
    const changes = await sql<{
      kind: 'silent' | 'resumed';
      organization_id: string;
      last_reading_at: Date;
      resumed_at: Date | null;
      now: Date;
    }>`
      WITH last AS MATERIALIZED (
        -- One backward probe of (organization_id, ingested_at) per organization.
        SELECT o.id AS org,
               (SELECT max(r.ingested_at) FROM temperature_readings r
                 WHERE r.organization_id = o.id
                   AND r.ingested_at > now() - make_interval(hours => ${config.ALERT_SILENCE_LOOKBACK_HOURS})) AS last_at
          FROM organizations o
      ), went_silent AS (
        INSERT INTO silence_state (organization_id, sensor_id, last_reading_at, silent_since)
        SELECT l.org, NULL, l.last_at, now() FROM last l
         WHERE l.last_at <= now() - make_interval(mins => ${config.ALERT_SILENCE_AFTER_MINUTES})
        ON CONFLICT DO NOTHING
        RETURNING organization_id, last_reading_at
      ), resumed AS (
        DELETE FROM silence_state s USING last l
         WHERE s.organization_id = l.org AND s.sensor_id IS NULL AND l.last_at > s.last_reading_at
        RETURNING s.organization_id, s.last_reading_at, l.last_at AS resumed_at
      )
      SELECT 'silent' AS kind, organization_id, last_reading_at, NULL::timestamptz AS resumed_at, now() AS now
        FROM went_silent
      UNION ALL
      SELECT 'resumed', organization_id, last_reading_at, resumed_at, now() FROM resumed
      ORDER BY 2, 1 DESC`.execute(trx);
    const now = changes.rows[0]?.now ? new Date(changes.rows[0].now) : new Date();
    await writeAlertEvents(
      trx,
      boss,
      changes.rows.map((c) =>
        c.kind === 'silent'
          ? {
              organizationId: c.organization_id,
              type: 'organization.silent' as const,
              data: {
                organization_id: c.organization_id,
                last_reading_at: new Date(c.last_reading_at).toISOString(),
                silent_after_minutes: config.ALERT_SILENCE_AFTER_MINUTES,
              },
            }
          : {
              organizationId: c.organization_id,
              type: 'organization.resumed' as const,
              data: {
                organization_id: c.organization_id,
                last_reading_before_silence_at: new Date(c.last_reading_at).toISOString(),
                resumed_at: c.resumed_at ? new Date(c.resumed_at).toISOString() : null,
              },
            },
      ),
      now,
    );
    const count = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM silence_state WHERE sensor_id IS NULL`.execute(trx);
    return {
      silent: changes.rows.filter((c) => c.kind === 'silent').map((c) => c.organization_id),
      resumed: changes.rows.filter((c) => c.kind === 'resumed').map((c) => c.organization_id),
      silentNow: count.rows[0]?.n ?? 0,
    };
  });
}
