// Sensors of an organization: register, list, rename, activate and deactivate. A change of the
// active set reports the new active_sensors count in the same transaction.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { sensorThresholdHook } from '../alerts/sensor-thresholds.js';
import type { Clock } from '../clock.js';
import type { DB } from '../db/schema.js';
import { reportActiveSensorsWithTimestamp } from '../metering/active-sensors.js';
import type { SensorView } from './schemas.js';

type Db = Kysely<DB> | Transaction<DB>;

interface SensorRow {
  id: string;
  name: string;
  active: boolean;
  created_at: Date;
  updated_at: Date;
}

const columns = ['id', 'name', 'active', 'created_at', 'updated_at'] as const;

function toView(row: SensorRow): SensorView {
  return {
    id: row.id,
    name: row.name,
    active: row.active,
    createdAt: row.created_at.toISOString(),
    updatedAt: row.updated_at.toISOString(),
  };
}

/**
 * Serializes changes to one organization's active set. Without it two concurrent changes could each
 * count the sensors without the other's uncommitted change, and the later-timestamped report (the
 * one Stripe's `last` formula keeps) would be stale. NO KEY UPDATE does not block sensor inserts'
 * foreign-key checks, ingestion or billing reads.
 */
async function lockActiveSet(trx: Transaction<DB>, organizationId: string): Promise<void> {
  await sql`SELECT 1 FROM organizations WHERE id = ${organizationId} FOR NO KEY UPDATE`.execute(trx);
}

export async function createSensor(
  trx: Transaction<DB>,
  boss: PgBoss,
  clock: Clock,
  organizationId: string,
  input: { name: string; active: boolean },
): Promise<SensorView> {
  if (input.active) await lockActiveSet(trx, organizationId);
  // Read after the lock: report timestamps then follow commit order.
  const now = clock.now();
  const row = await trx
    .insertInto('sensors')
    .values({
      organization_id: organizationId,
      name: input.name,
      active: input.active,
      created_at: now,
      updated_at: now,
    })
    .returning(columns)
    .executeTakeFirstOrThrow();
  if (input.active) await reportActiveSet(trx, boss, organizationId, now);
  return toView(row);
}

/** The active set's new count, reported at `now` and applied to its active_sensors thresholds. */
const reportActiveSet = (trx: Transaction<DB>, boss: PgBoss, organizationId: string, now: Date) =>
  reportActiveSensorsWithTimestamp(trx, boss, organizationId, now, undefined, sensorThresholdHook(boss));

/**
 * Renames and/or (de)activates one of the organization's sensors. Returns null when the sensor does
 * not exist or belongs to another organization (the caller answers 404 either way).
 */
export async function updateSensor(
  trx: Transaction<DB>,
  boss: PgBoss,
  clock: Clock,
  organizationId: string,
  sensorId: string,
  patch: { name?: string | undefined; active?: boolean | undefined },
): Promise<SensorView | null> {
  if (patch.active !== undefined) await lockActiveSet(trx, organizationId);
  const current = await trx
    .selectFrom('sensors')
    .select(columns)
    .where('id', '=', sensorId)
    .where('organization_id', '=', organizationId)
    .forUpdate()
    .executeTakeFirst();
  if (!current) return null;
  const activeChanged = patch.active !== undefined && patch.active !== current.active;
  const renamed = patch.name !== undefined && patch.name !== current.name;
  if (!activeChanged && !renamed) return toView(current);
  const now = clock.now();
  const row = await trx
    .updateTable('sensors')
    .set({
      ...(renamed ? { name: patch.name } : {}),
      ...(activeChanged ? { active: patch.active } : {}),
      updated_at: now,
    })
    .where('id', '=', sensorId)
    // By its organization too: one shard on Citus (by id alone the update ran on every shard, and the
    // report's alert events, reference-table writes, were refused after it).
    .where('organization_id', '=', organizationId)
    .returning(columns)
    .executeTakeFirstOrThrow();
  if (activeChanged) await reportActiveSet(trx, boss, organizationId, now);
  return toView(row);
}

export class UnknownCursorError extends Error {
  constructor() {
    super('unknown cursor');
    this.name = 'UnknownCursorError';
  }
}

/** One page of the organization's sensors in creation order; the cursor is the last sensor's id. */
export async function listSensors(
  db: Db,
  organizationId: string,
  page: { limit: number; cursor?: string | undefined; active?: boolean | undefined },
): Promise<{ sensors: SensorView[]; nextCursor: string | null }> {
  let query = db
    .selectFrom('sensors')
    .select(columns)
    .where('organization_id', '=', organizationId)
    .orderBy('created_at')
    .orderBy('id')
    .limit(page.limit + 1);
  if (page.active !== undefined) query = query.where('active', '=', page.active);
  if (page.cursor !== undefined) {
    const after = await db
      .selectFrom('sensors')
      .select(['created_at', 'id'])
      .where('organization_id', '=', organizationId)
      .where('id', '=', page.cursor)
      .executeTakeFirst();
    if (!after) throw new UnknownCursorError();
    // Compare in SQL against the stored row so microsecond timestamps never lose precision in JS.
    query = query.where(
      sql<boolean>`(created_at, id) > (SELECT created_at, id FROM sensors WHERE id = ${page.cursor})`,
    );
  }
  const rows = await query.execute();
  const more = rows.length > page.limit;
  const sensors = rows.slice(0, page.limit).map(toView);
  return { sensors, nextCursor: more ? (sensors.at(-1)?.id ?? null) : null };
}
