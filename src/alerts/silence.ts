// Silence alerts: an organization that stored readings within ALERT_SILENCE_LOOKBACK_HOURS and none
// for ALERT_SILENCE_AFTER_MINUTES gets one `organization.silent` event; its next reading, one
// `organization.resumed`. Decided on the database's clock (now()), so hosts whose clocks differ agree.
// "Once" is the silence_state row: a conditional insert starts a silence, a delete ends it, each in
// the transaction that writes its event.
// Per sensor, for organizations that turned it on (alert_sensor_silence, opt-in so a large fleet does
// not flood the operator): a sensor whose newest reading (by recorded time) within the lookback was
// stored more than ALERT_SILENCE_AFTER_MINUTES ago gets one `sensor.silent`, and one `sensor.resumed`
// when a newer reading is stored. One backward probe of the readings' key (sensor_id, recorded_at) per
// active sensor of those organizations; inactive sensors (which cannot send) are left out.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import { writeAlertEvents } from './events.js';

export interface SilencePass {
  silent: string[];
  resumed: string[];
  /** Organizations silent after the pass. */
  silentNow: number;
  /** Sensors that went silent and that resumed in this pass ("organization/sensor"). */
  sensorsSilent: string[];
  sensorsResumed: string[];
  /** Sensors silent after the pass. */
  sensorsSilentNow: number;
}

export async function silencePass(
  db: Kysely<DB>,
  boss: PgBoss,
  config: Pick<Config, 'ALERT_SILENCE_LOOKBACK_HOURS' | 'ALERT_SILENCE_AFTER_MINUTES'>,
): Promise<SilencePass> {
  if (config.ALERT_SILENCE_AFTER_MINUTES === 0)
    return {
      silent: [],
      resumed: [],
      silentNow: 0,
      sensorsSilent: [],
      sensorsResumed: [],
      sensorsSilentNow: 0,
    };
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
    const sensors = await sensorSilence(trx, boss, config);
    const count = await sql<{ orgs: number; sensors: number }>`
      SELECT count(*) FILTER (WHERE sensor_id IS NULL)::int AS orgs,
             count(*) FILTER (WHERE sensor_id IS NOT NULL)::int AS sensors
        FROM silence_state`.execute(trx);
    return {
      silent: changes.rows.filter((c) => c.kind === 'silent').map((c) => c.organization_id),
      resumed: changes.rows.filter((c) => c.kind === 'resumed').map((c) => c.organization_id),
      silentNow: count.rows[0]?.orgs ?? 0,
      ...sensors,
      sensorsSilentNow: count.rows[0]?.sensors ?? 0,
    };
  });
}

/** The per-sensor part of a pass, in its transaction (see the head of this file). */
async function sensorSilence(
  trx: Transaction<DB>,
  boss: PgBoss,
  config: Pick<Config, 'ALERT_SILENCE_LOOKBACK_HOURS' | 'ALERT_SILENCE_AFTER_MINUTES'>,
): Promise<{ sensorsSilent: string[]; sensorsResumed: string[] }> {
  // Silences of sensors no longer watched (the organization turned it off, the sensor was deactivated
  // or removed) end without an event: nobody asked to hear about those sensors any more.
  await sql`
    DELETE FROM silence_state st
     WHERE st.sensor_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM alert_sensor_silence a
                         JOIN sensors s ON s.organization_id = a.organization_id AND s.active
                        WHERE a.organization_id = st.organization_id AND s.id = st.sensor_id)`.execute(trx);
  const changes = await sql<{
    kind: 'silent' | 'resumed';
    organization_id: string;
    sensor_id: string;
    last_reading_at: Date;
    resumed_at: Date | null;
    now: Date;
  }>`
    WITH last AS MATERIALIZED (
      SELECT s.organization_id AS org, s.id AS sensor,
             (SELECT r.ingested_at FROM temperature_readings r
               WHERE r.sensor_id = s.id
                 AND r.recorded_at > now() - make_interval(hours => ${config.ALERT_SILENCE_LOOKBACK_HOURS})
               ORDER BY r.recorded_at DESC LIMIT 1) AS last_at
        FROM alert_sensor_silence a JOIN sensors s ON s.organization_id = a.organization_id AND s.active
    ), went_silent AS (
      INSERT INTO silence_state (organization_id, sensor_id, last_reading_at, silent_since)
      SELECT l.org, l.sensor, l.last_at, now() FROM last l
       WHERE l.last_at <= now() - make_interval(mins => ${config.ALERT_SILENCE_AFTER_MINUTES})
      ON CONFLICT DO NOTHING
      RETURNING organization_id, sensor_id, last_reading_at
    ), resumed AS (
      DELETE FROM silence_state st USING last l
       WHERE st.organization_id = l.org AND st.sensor_id = l.sensor AND l.last_at > st.last_reading_at
      RETURNING st.organization_id, st.sensor_id, st.last_reading_at, l.last_at AS resumed_at
    )
    SELECT 'silent' AS kind, organization_id, sensor_id, last_reading_at, NULL::timestamptz AS resumed_at,
           now() AS now
      FROM went_silent
    UNION ALL
    SELECT 'resumed', organization_id, sensor_id, last_reading_at, resumed_at, now() FROM resumed
    ORDER BY 2, 3, 1 DESC`.execute(trx);
  const now = changes.rows[0]?.now ? new Date(changes.rows[0].now) : new Date();
  await writeAlertEvents(
    trx,
    boss,
    changes.rows.map((c) =>
      c.kind === 'silent'
        ? {
            organizationId: c.organization_id,
            type: 'sensor.silent' as const,
            data: {
              organization_id: c.organization_id,
              sensor_id: c.sensor_id,
              last_reading_at: new Date(c.last_reading_at).toISOString(),
              silent_after_minutes: config.ALERT_SILENCE_AFTER_MINUTES,
            },
          }
        : {
            organizationId: c.organization_id,
            type: 'sensor.resumed' as const,
            data: {
              organization_id: c.organization_id,
              sensor_id: c.sensor_id,
              last_reading_before_silence_at: new Date(c.last_reading_at).toISOString(),
              resumed_at: c.resumed_at ? new Date(c.resumed_at).toISOString() : null,
            },
          },
    ),
    now,
  );
  const key = (c: { organization_id: string; sensor_id: string }) => `${c.organization_id}/${c.sensor_id}`;
  return {
    sensorsSilent: changes.rows.filter((c) => c.kind === 'silent').map(key),
    sensorsResumed: changes.rows.filter((c) => c.kind === 'resumed').map(key),
  };
}

/** Turns per-sensor silence alerts on or off for an organization; false when it does not exist. */
export async function setSensorSilenceAlerts(
  db: Kysely<DB>,
  organizationId: string,
  enabled: boolean,
): Promise<boolean> {
  const org = await sql`SELECT 1 FROM organizations WHERE id = ${organizationId}`.execute(db);
  if (org.rows.length === 0) return false;
  if (enabled)
    await sql`INSERT INTO alert_sensor_silence (organization_id) VALUES (${organizationId})
              ON CONFLICT DO NOTHING`.execute(db);
  else await sql`DELETE FROM alert_sensor_silence WHERE organization_id = ${organizationId}`.execute(db);
  return true;
}

/** Whether per-sensor silence alerts are on for an organization. */
export async function sensorSilenceAlertsOn(db: Kysely<DB>, organizationId: string): Promise<boolean> {
  const row = await sql`SELECT 1 FROM alert_sensor_silence WHERE organization_id = ${organizationId}`.execute(
    db,
  );
  return row.rows.length > 0;
}
