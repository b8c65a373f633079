// The request trace contexts of the usage rows a batch carries (the batch reads them through its store,
// store.ts, while tracing records).
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

/**
 * The request trace contexts (migrations/0051) of the usage rows each group carries, by the group's
 * identifier (committed on its rows by the claim), oldest row first. Read only while tracing records
 * (batch.ts): one indexed read (meter_outbox_identifier), routed by organization on Citus.
 */
export async function outboxTraceparents(
  db: Kysely<DB>,
  groups: readonly { organizationId: string; identifier: string }[],
): Promise<Map<string, string[]>> {
  const traces = new Map<string, string[]>();
  if (groups.length === 0) return traces;
  const result = await sql<{ identifier: string; traceparents: string[] }>`
    SELECT identifier, array_agg(traceparent ORDER BY id) AS traceparents FROM meter_outbox
     WHERE organization_id = ANY(${[...new Set(groups.map((g) => g.organizationId))]}::uuid[])
       AND identifier = ANY(${groups.map((g) => g.identifier)}::text[])
       AND kind = 'usage' AND traceparent IS NOT NULL
     GROUP BY identifier`.execute(db);
  for (const row of result.rows) traces.set(row.identifier, row.traceparents);
  return traces;
}
