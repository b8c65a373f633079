// What the claim's write of a group's identifier costs, by where the identifier lives (`npm run bench --
// --cost --only claim-update`; issue 43). The claim commits each group's identifier into its outbox rows
// before any call (claim-statement-sql.ts, `grouped`), and that UPDATE was 39% of the claims' time in an
// analyzed run (docs/benchmarks.md, "Where a claim's time goes, node by node"). This measures that one
// write three ways on one cluster, the same rows' shape, rounds alternated:
//
// * `schema`: the claim's UPDATE on meter_outbox as migrated. identifier and identified_at are columns of
//   three of its indexes (meter_outbox_identifier, _inflight, _identified_pending), so no update that sets
//   them can be heap-only: each writes a new row version and an entry in every index whose predicate holds.
// * `unindexed`: the same UPDATE on a database whose meter_outbox lacks those three indexes (nothing else
//   changed): the rows change no indexed column, so the update is heap-only (HOT) where the page has room
//   (the table's fillfactor is 60). What the write costs if "in flight" were found some other way.
// * `members`: the rows' identifiers inserted into a narrow table (organization, outbox id, identifier,
//   instant; its primary key the one index): what the write costs if a group's membership lived beside the
//   outbox instead of in it.
//
// Each statement writes 1,000 rows of 1,000 organizations (one row each, rows scattered over the table as a
// claim of 1,000 keys finds them), in its own transaction with synchronous_commit on (the claim's commit).
// Measured per statement: its time from this process, the cluster's CPU (/proc; nothing else runs), the WAL
// it wrote (full-page images included: the first write of a page after the seed's checkpoint carries one,
// as a claim's after any checkpoint), and how many of its updates were heap-only
// (pg_stat_get_xact_tuples_hot_updated before and after the statement). Only the write: a design that
// moves the identifier must also find in-flight groups without those indexes, which this does not price.
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { type Cluster, freshDatabase, percentile, serverCpuSeconds } from './harness.js';
import { walBytesBetween, walPosition } from './wal.js';

const ORGANIZATIONS = 20_000;
const ROWS_PER_ORGANIZATION = 10;
const ROWS_PER_STATEMENT = 1_000;
const ROUNDS = 12;
/** The indexes whose columns or predicates name identifier or identified_at (migrations/schema.sql). */
const IDENTIFIER_INDEXES = [
  'meter_outbox_identifier',
  'meter_outbox_inflight',
  'meter_outbox_identified_pending',
];

type Variant = 'schema' | 'unindexed' | 'members';
const VARIANTS: readonly Variant[] = ['schema', 'unindexed', 'members'];

export interface ClaimUpdateRow {
  variant: Variant;
  statements: number;
  medianMs: number;
  cpuMsPerRow: number;
  walBytesPerRow: number;
  /** Of the rows updated, the share written heap-only (members: no update, 0). */
  hotShare: number;
}

interface Target {
  pool: pg.Pool;
  /** Rows not written yet, shuffled: [organization_id, id]. */
  rows: [string, string][];
}

async function seed(url: string, dropIdentifierIndexes: boolean): Promise<Target> {
  // Two connections: the statement's, and the WAL position read around it.
  const pool = new pg.Pool({ connectionString: url, max: 2 });
  await pool.query(
    `INSERT INTO organizations (id, name) SELECT gen_random_uuid(), 'org ' || g FROM generate_series(1, $1) g`,
    [ORGANIZATIONS],
  );
  // The rows of one organization are inserted apart from each other, as readings arrive over an hour.
  await pool.query(
    `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
     SELECT o.id, 'temperature_readings', 'cus_' || substr(md5(o.id::text), 1, 14), 1, now() - make_interval(secs => g)
       FROM generate_series(1, $1) g CROSS JOIN organizations o`,
    [ROWS_PER_ORGANIZATION],
  );
  if (dropIdentifierIndexes) for (const index of IDENTIFIER_INDEXES) await pool.query(`DROP INDEX ${index}`);
  await pool.query(
    `CREATE TABLE claim_members (organization_id uuid NOT NULL, outbox_id bigint NOT NULL, identifier text NOT NULL,
       identified_at timestamptz NOT NULL, PRIMARY KEY (organization_id, outbox_id))`,
  );
  await pool.query('VACUUM ANALYZE');
  await pool.query('CHECKPOINT');
  const { rows } = await pool.query<{ organization_id: string; id: string }>(
    'SELECT organization_id, id::text AS id FROM meter_outbox ORDER BY random()',
  );
  return { pool, rows: rows.map((r) => [r.organization_id, r.id]) };
}

/** The next statement's rows: one row of each of 1,000 organizations not yet taken. */
function take(target: Target): [string, string][] {
  const seen = new Set<string>();
  const picked: [string, string][] = [];
  const rest: [string, string][] = [];
  for (const row of target.rows) {
    if (picked.length < ROWS_PER_STATEMENT && !seen.has(row[0])) {
      seen.add(row[0]);
      picked.push(row);
    } else rest.push(row);
  }
  target.rows = rest;
  return picked;
}

const identifier = () => `mtr_${randomBytes(20).toString('hex')}`;

async function write(
  target: Target,
  variant: Variant,
  dataDir: string,
): Promise<{ ms: number; cpu: number; wal: number; hot: number; rows: number }> {
  const rows = take(target);
  const params = [rows.map((r) => r[0]), rows.map((r) => r[1]), rows.map(() => identifier())];
  const client = await target.pool.connect();
  try {
    const wal0 = await walPosition(target.pool);
    const cpu0 = serverCpuSeconds(dataDir);
    const started = performance.now();
    await client.query('BEGIN');
    await client.query(`SET LOCAL synchronous_commit = on`);
    // The backend's counts since its statistics were last flushed, not this transaction's alone: a difference.
    const hotOf = async () =>
      Number(
        (
          await client.query<{ n: string }>(
            `SELECT pg_stat_get_xact_tuples_hot_updated('meter_outbox'::regclass)::text AS n`,
          )
        ).rows[0]?.n ?? 0,
      );
    const hot0 = await hotOf();
    const written =
      variant === 'members'
        ? await client.query(
            `INSERT INTO claim_members (organization_id, outbox_id, identifier, identified_at)
             SELECT m.organization_id, m.id, m.identifier, now()
               FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS m(organization_id, id, identifier)`,
            params,
          )
        : await client.query(
            `UPDATE meter_outbox o SET identifier = m.identifier, identified_at = now(), updated_at = now()
               FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS m(organization_id, id, identifier)
              WHERE o.organization_id = m.organization_id AND o.id = m.id
                AND o.status = 'pending' AND o.identifier IS NULL`,
            params,
          );
    const hot = (await hotOf()) - hot0;
    await client.query('COMMIT');
    const ms = performance.now() - started;
    const cpu = serverCpuSeconds(dataDir) - cpu0;
    const wal = await walBytesBetween(target.pool, wal0);
    if (written.rowCount !== rows.length)
      throw new Error(`${variant}: wrote ${written.rowCount} of ${rows.length} rows`);
    return { ms, cpu, wal, hot, rows: rows.length };
  } finally {
    client.release();
  }
}

export async function runClaimUpdate(
  cluster: Cluster,
  log: (msg: string) => void,
): Promise<ClaimUpdateRow[]> {
  log(
    `--- the claim's identifier write: ${ROUNDS} rounds of ${ROWS_PER_STATEMENT} rows a statement, ${ORGANIZATIONS * ROWS_PER_ORGANIZATION} outbox rows`,
  );
  const schema = await seed(await freshDatabase(cluster, 'cost_claim_schema'), false);
  const unindexed = await seed(await freshDatabase(cluster, 'cost_claim_unindexed'), true);
  const targets: Record<Variant, Target> = { schema, unindexed, members: schema };
  const samples = new Map<Variant, { ms: number; cpu: number; wal: number; hot: number; rows: number }[]>(
    VARIANTS.map((v) => [v, []]),
  );
  try {
    for (let round = 0; round < ROUNDS; round++) {
      // Each round in another order, so the machine's drift favours no variant.
      const order = VARIANTS.map((_, i) => VARIANTS[(i + round) % VARIANTS.length]!);
      for (const variant of order)
        samples.get(variant)!.push(await write(targets[variant], variant, cluster.dataDir));
    }
  } finally {
    await schema.pool.end();
    await unindexed.pool.end();
  }
  const result = VARIANTS.map((variant): ClaimUpdateRow => {
    const s = samples.get(variant)!;
    const rows = s.reduce((n, x) => n + x.rows, 0);
    return {
      variant,
      statements: s.length,
      medianMs:
        Math.round(
          percentile(
            s.map((x) => x.ms).sort((a, b) => a - b),
            50,
          ) * 100,
        ) / 100,
      cpuMsPerRow: Math.round((s.reduce((n, x) => n + x.cpu, 0) / rows) * 1e6) / 1e3,
      walBytesPerRow: Math.round(s.reduce((n, x) => n + x.wal, 0) / rows),
      hotShare: Math.round((s.reduce((n, x) => n + x.hot, 0) / rows) * 1000) / 1000,
    };
  });
  log('| write | statements | median ms a statement | Postgres CPU ms a row | WAL bytes a row | heap-only |');
  log('|---|---|---|---|---|---|');
  for (const r of result)
    log(
      `| ${r.variant} | ${r.statements} | ${r.medianMs} | ${r.cpuMsPerRow} | ${r.walBytesPerRow} | ${r.hotShare} |`,
    );
  return result;
}
