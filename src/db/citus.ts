// Distribution of meterbox's tables over a Citus cluster (`meterbox citus distribute`, issue 28):
// run on the coordinator after the migrations; idempotent; the migration runner runs it again after
// migrations applied to an already distributed database, so a later migration's new table is
// distributed too. Never imports application code (the migration runner uses it).
//
//   * tenant tables: distributed by organization_id, all co-located with `sensors`, so everything
//     of one organization (its sensors, readings, outbox rows, corrections, rollups) sits in one
//     shard group: its statements are single-shard and its foreign keys hold inside the shard;
//   * the directory, read by what arrives without an organization (an API key's hash, a Stripe
//     customer id, a webhook's event id), small and rarely written: reference tables, a copy on
//     every node, joinable with any shard;
//   * delivery state (a key's lease, pacing, backoff, hold) is tenant data too: distributed by
//     organization_id with the outbox rows it delivers, so a key's claim and settle are single-shard;
//     the account-wide call budget (one row): a single-shard table;
//   * pg-boss: its own schema, local on the coordinator (it is not in public).
// A table that this plan does not name (a later migration's) is distributed by organization_id when
// it has that column, else made a reference table.
//
// Why this file is long: the placement of every table and the statements that apply it, together, so that a
// new table's placement is read beside how it is distributed.
import type pg from 'pg';

export type Placement =
  | { kind: 'reference' }
  | { kind: 'distributed'; column: string; colocateWith: string | null }
  | { kind: 'single-shard' };

/** The first table distributed by organization_id; every other tenant table is co-located with it. */
export const TENANT_ANCHOR = 'sensors';

/** Tables whose placement is decided by name, in the order they are distributed. */
export const PLAN: ReadonlyArray<readonly [string, Placement]> = [
  ['organizations', { kind: 'reference' }],
  ['subscriptions', { kind: 'reference' }],
  ['api_keys', { kind: 'reference' }],
  ['stripe_events', { kind: 'reference' }],
  // Stripe Connect (0055): a customer's account, small, written at link time, read by delivery and webhooks.
  ['stripe_customer_accounts', { kind: 'reference' }],
  ['meter_error_reports', { kind: 'reference' }],
  ['stripe_poison_events', { kind: 'reference' }],
  // Small, rarely written, joined by ingestion's statement next to subscriptions (a reference table).
  ['organization_destinations', { kind: 'reference' }],
  // One row per period-boundary migration (migrations/0058), read with organization_destinations.
  ['organization_period_migrations', { kind: 'reference' }],
  // Looked up by a token's hash alone (GET /v1/usage), like api_keys (migrations/0050).
  ['usage_tokens', { kind: 'reference' }],
  // Alerts and outgoing webhooks (migrations/0045): few rows, written at an alert's pace, not a
  // reading's; keyed by their own sequences and ids (an event of no organization, an endpoint of the
  // operator), with foreign keys between them: reference tables, which ingestion's threshold probe can
  // join inside its single-shard statement. Referenced tables first.
  ['webhook_endpoints', { kind: 'reference' }],
  ['alert_thresholds', { kind: 'reference' }],
  // Threshold usage per organization and meter (migrations/0082), written with the thresholds: the same.
  ['alert_usage_counters', { kind: 'reference' }],
  ['alert_events', { kind: 'reference' }],
  ['webhook_deliveries', { kind: 'reference' }],
  ['webhook_attempts', { kind: 'reference' }],
  ['silence_state', { kind: 'reference' }],
  // Organizations with per-sensor silence alerts on (migrations/0062): a handful of rows.
  ['alert_sensor_silence', { kind: 'reference' }],
  [TENANT_ANCHOR, { kind: 'distributed', column: 'organization_id', colocateWith: null }],
  ['usage_corrections', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['temperature_readings', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['meter_outbox', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['idempotency_keys', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['readings_hourly_rollup', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['meter_usage_hourly', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['meter_delivery_keys', { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }],
  ['meter_call_budget', { kind: 'single-shard' }],
  ['destination_health', { kind: 'single-shard' }],
];

/** Tables that stay local on the coordinator: the migration ledger (the runner's own). */
export const LOCAL_TABLES: ReadonlySet<string> = new Set(['schema_migrations']);

export class CitusAbsentError extends Error {
  constructor() {
    super('Citus is absent: this database has no citus extension (run this on a Citus coordinator)');
    this.name = 'CitusAbsentError';
  }
}

type Query = Pick<pg.ClientBase, 'query'>;

/** Whether the database has the citus extension installed. */
export async function citusInstalled(db: Query): Promise<boolean> {
  const { rows } = await db.query(`SELECT 1 FROM pg_extension WHERE extname = 'citus'`);
  return rows.length > 0;
}

/** Whether `meterbox citus distribute` has run here (the anchor is distributed). */
export async function citusDistributed(db: Query): Promise<boolean> {
  if (!(await citusInstalled(db))) return false;
  const { rows } = await db.query(
    `SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass('public.' || $1::text)`,
    [TENANT_ANCHOR],
  );
  return rows.length > 0;
}

interface TableState {
  name: string;
  /** pg_dist_partition.partmethod: 'h' hash, 'n' reference or Citus-managed local, null: local. */
  method: string | null;
  /** pg_dist_partition.repmodel 't' with partmethod 'n' is a reference table; 's' a local one. */
  reference: boolean;
  singleShard: boolean;
  hasOrganization: boolean;
  /** Public tables this one references by foreign key. */
  references: string[];
}

async function publicTables(db: Query): Promise<TableState[]> {
  const { rows } = await db.query<{
    name: string;
    method: string | null;
    repmodel: string | null;
    single_shard: boolean;
    has_organization: boolean;
    references: string[];
  }>(`
    SELECT c.relname AS name,
           p.partmethod AS method,
           p.repmodel,
           (p.partmethod = 'n' AND p.repmodel = 's' AND p.colocationid <> 0) AS single_shard,
           EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attname = 'organization_id' AND NOT a.attisdropped)
             AS has_organization,
           ARRAY(SELECT DISTINCT r.relname::text FROM pg_constraint k JOIN pg_class r ON r.oid = k.confrelid
                  WHERE k.conrelid = c.oid AND k.contype = 'f' AND r.oid <> c.oid) AS references
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid
     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
     ORDER BY c.relname`);
  return rows.map((r) => ({
    name: r.name,
    method: r.method,
    reference: r.method === 'n' && r.repmodel === 't',
    singleShard: r.single_shard === true,
    hasOrganization: r.has_organization,
    references: r.references,
  }));
}

/** Where a table goes: by name in PLAN, else by whether it has organization_id. */
export function placementOf(name: string, hasOrganization: boolean): Placement {
  const planned = PLAN.find(([table]) => table === name);
  if (planned) return planned[1];
  return hasOrganization
    ? { kind: 'distributed', column: 'organization_id', colocateWith: TENANT_ANCHOR }
    : { kind: 'reference' };
}

function done(table: TableState, placement: Placement): boolean {
  switch (placement.kind) {
    case 'reference':
      return table.reference;
    case 'single-shard':
      return table.singleShard;
    case 'distributed':
      return table.method === 'h';
  }
}

export interface DistributeResult {
  /** Tables distributed by this run, with where they went and how long their copy took (ms). */
  distributed: { table: string; placement: Placement; ms: number }[];
  /** Tables that already were. */
  alreadyDistributed: string[];
  /**
   * Distributed tables whose rows were still in the coordinator's own (shell) table, emptied by this
   * run: Citus copies a table's rows into its shards and leaves the local copy behind.
   */
  truncated: string[];
  /** Attempts at taking the tables' locks (distributeTables only; 1 inside a caller's transaction). */
  lockAttempts: number;
  /** From the LOCK statement (its wait included) to the commit, distributeTables only: how long the tables were held. */
  lockedMs: number;
}

/**
 * Orders the tables still to distribute: reference tables before what references them, the
 * anchors first, PLAN's order otherwise, later tables after (Citus checks each foreign key when
 * its second table is distributed).
 */
function order(pending: TableState[]): TableState[] {
  const rank = (t: TableState) => {
    const i = PLAN.findIndex(([name]) => name === t.name);
    return i === -1 ? PLAN.length : i;
  };
  const sorted = [...pending].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
  const result: TableState[] = [];
  const placed = new Set<string>();
  const names = new Set(sorted.map((t) => t.name));
  while (sorted.length > 0) {
    const index = sorted.findIndex((t) => t.references.every((r) => !names.has(r) || placed.has(r)));
    const [next] = sorted.splice(index === -1 ? 0 : index, 1);
    if (!next) break;
    result.push(next);
    placed.add(next.name);
  }
  return result;
}

/** A name as an SQL identifier. */
function ident(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

function statementFor(name: string, placement: Placement): string {
  const table = `'public.${name}'`;
  switch (placement.kind) {
    case 'reference':
      return `SELECT create_reference_table(${table})`;
    case 'single-shard':
      return `SELECT create_distributed_table(${table}, NULL, colocate_with => 'none')`;
    case 'distributed':
      return placement.colocateWith === null
        ? `SELECT create_distributed_table(${table}, '${placement.column}', colocate_with => 'none')`
        : `SELECT create_distributed_table(${table}, '${placement.column}', colocate_with => 'public.${placement.colocateWith}')`;
  }
}

/** How long one attempt waits for the tables' locks before it gives them back and tries again. */
export const DISTRIBUTE_LOCK_TIMEOUT_MS = 2_000;
/** Attempts at taking the locks before distribute gives up (the database stays as it was). */
export const DISTRIBUTE_LOCK_ATTEMPTS = 30;

/**
 * Distributes every public table but the local ones, as planned, moving the rows they hold into
 * their shards; tables already placed are left alone. One transaction: interrupted (a crash, a
 * cancelled statement, a lost connection), it leaves every table where it was, rows and foreign
 * keys included, and the next run starts again from there; run again after success, it does
 * nothing. Throws CitusAbsentError on plain Postgres. `client` is one session.
 *
 * The tables it changes are locked ACCESS EXCLUSIVE up front, in one statement, with a lock timeout:
 * taken one by one as each step needed them, a lock waiting behind a long transaction would hold
 * the tables already locked (and every request queued behind them) for as long; here such a wait
 * ends after DISTRIBUTE_LOCK_TIMEOUT_MS, the attempt gives everything back and tries again. The
 * tables then stay locked until the commit: the copy of their rows (see docs/scaling.md for what
 * that costs per row).
 */
export async function distributeTables(
  client: Query,
  options: { lockTimeoutMs?: number; lockAttempts?: number; retryDelayMs?: number } = {},
): Promise<DistributeResult> {
  if (!(await citusInstalled(client))) throw new CitusAbsentError();
  const attempts = options.lockAttempts ?? DISTRIBUTE_LOCK_ATTEMPTS;
  for (let attempt = 1; ; attempt++) {
    await client.query('BEGIN');
    try {
      await client.query(
        `SET LOCAL lock_timeout = '${options.lockTimeoutMs ?? DISTRIBUTE_LOCK_TIMEOUT_MS}ms'`,
      );
      const tables = await lockTargets(client);
      const lockedAt = performance.now();
      if (tables.length > 0) {
        await client.query(
          `LOCK TABLE ${tables.map((t) => `public.${ident(t)}`).join(', ')} IN ACCESS EXCLUSIVE MODE`,
        );
      }
      await client.query('SET LOCAL lock_timeout = 0');
      const result = await distributeInTransaction(client);
      await client.query('COMMIT');
      return { ...result, lockAttempts: attempt, lockedMs: Math.round(performance.now() - lockedAt) };
    } catch (err) {
      await client.query('ROLLBACK');
      // 55P03: the lock timeout; 40P01: a deadlock with a transaction that held one of the tables
      // and wanted another: either way nothing is held any more, and another attempt may succeed.
      const state = (err as { code?: unknown }).code;
      if ((state !== '55P03' && state !== '40P01') || attempt >= attempts) throw err;
      await new Promise((resolve) => setTimeout(resolve, options.retryDelayMs ?? 250 * Math.min(attempt, 8)));
    }
  }
}

/**
 * The public tables a run will change: those still to distribute, the tables their foreign keys
 * point at (whose constraints are dropped and added back), and distributed tables that still hold
 * local rows. Ordered by name: every attempt locks in the same order.
 */
async function lockTargets(client: Query): Promise<string[]> {
  const tables = await publicTables(client);
  const pending = tables.filter(
    (t) => !LOCAL_TABLES.has(t.name) && !done(t, placementOf(t.name, t.hasOrganization)),
  );
  const names = new Set(pending.map((t) => t.name));
  for (const table of tables) {
    if (table.references.some((r) => names.has(r))) names.add(table.name);
  }
  for (const table of pending) for (const r of table.references) names.add(r);
  for (const name of await leftoverLocalData(client)) names.add(name);
  return [...names].sort();
}

/**
 * Distributed tables (on the coordinator) whose own relation, or a partition's, still holds rows:
 * what Citus left behind when it copied them into their shards. Measured by the relation's size on
 * disk, which an emptied table keeps until vacuum: a table reported here may hold no live row, and
 * emptying it again costs nothing.
 */
async function leftoverLocalData(client: Query): Promise<string[]> {
  const { rows } = await client.query<{ name: string }>(`
    SELECT c.relname AS name
      FROM pg_dist_partition p
      JOIN pg_class c ON c.oid = p.logicalrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND NOT c.relispartition
       -- pg_partition_tree lists a partitioned table and its partitions, nothing for a plain table.
       AND pg_relation_size(c.oid)
           + (SELECT coalesce(sum(pg_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t) > 0
     ORDER BY 1`);
  return rows.map((r) => r.name);
}

/**
 * The same inside the caller's open transaction (the migration runner's: a migration and the
 * distribution of the tables it creates commit together).
 */
export async function distributeInTransaction(client: Query): Promise<DistributeResult> {
  // api_keys' revocation trigger (0010) notifies the API processes listening on the coordinator.
  // Citus creates a reference table's triggers on every placement, the coordinator's included, and
  // runs a write's coordinator placement in the writing session, so the notification still
  // reaches them at commit; Citus calls such triggers unsafe because a trigger on a worker's
  // placement could write elsewhere, which this one does not.
  await client.query('SET LOCAL citus.enable_unsafe_triggers = on');
  // Distribution of tables linked by foreign keys, in one session: sequential mode lets each
  // create_distributed_table see the shards the previous one made.
  await client.query(`SET LOCAL citus.multi_shard_modify_mode = 'sequential'`);
  const tables = await publicTables(client);
  const result: DistributeResult = {
    distributed: [],
    alreadyDistributed: [],
    truncated: [],
    lockAttempts: 1,
    lockedMs: 0,
  };
  const pending: TableState[] = [];
  for (const table of tables) {
    if (LOCAL_TABLES.has(table.name)) continue;
    if (done(table, placementOf(table.name, table.hasOrganization)))
      result.alreadyDistributed.push(table.name);
    else pending.push(table);
  }
  if (pending.length > 0) await placePending(client, pending, result);
  // Citus copies a table's rows into its shards and leaves them in the coordinator's table too,
  // where they take disk and would be read again by anything that bypasses Citus (a dump, for one);
  // a run that stopped between the two, or an older version of this command, left them there.
  for (const table of await leftoverLocalData(client)) {
    await client.query(`SELECT truncate_local_data_after_distributing_table('public.${ident(table)}')`);
    result.truncated.push(table);
  }
  return result;
}

async function placePending(client: Query, pending: TableState[], result: DistributeResult): Promise<void> {
  // Citus checks a foreign key when its second table is distributed, and turns a local table that
  // references a reference table into a Citus-managed local one; so the foreign keys that touch a
  // table still to distribute are dropped first and added back once every table is placed.
  const names = pending.map((t) => t.name);
  const { rows: keys } = await client.query<{ table: string; name: string; definition: string }>(
    `SELECT c.relname AS table, k.conname AS name, pg_get_constraintdef(k.oid) AS definition
       FROM pg_constraint k
       JOIN pg_class c ON c.oid = k.conrelid
       JOIN pg_class r ON r.oid = k.confrelid
       JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE k.contype = 'f' AND n.nspname = 'public' AND k.conparentid = 0
        AND (c.relname = ANY($1::text[]) OR r.relname = ANY($1::text[]))
      ORDER BY c.relname, k.conname`,
    [names],
  );
  for (const key of keys)
    await client.query(`ALTER TABLE public.${ident(key.table)} DROP CONSTRAINT ${ident(key.name)}`);
  for (const table of order(pending)) {
    const placement = placementOf(table.name, table.hasOrganization);
    // A table Citus already manages as a local one (a new table with a foreign key to a reference
    // table becomes one automatically), or one placed otherwise before (a reference table the plan
    // now distributes), is turned back into a plain table first: Citus places only plain tables.
    if (table.method !== null) {
      await client.query(
        `SELECT undistribute_table('public.${table.name}', cascade_via_foreign_keys => true)`,
      );
    }
    const started = performance.now();
    await client.query(statementFor(table.name, placement));
    result.distributed.push({ table: table.name, placement, ms: Math.round(performance.now() - started) });
  }
  for (const key of keys) {
    await client.query(
      `ALTER TABLE public.${ident(key.table)} ADD CONSTRAINT ${ident(key.name)} ${key.definition}`,
    );
  }
}

/**
 * For a migration about to run on a distributed database (inside its transaction): a new table with
 * a foreign key to a reference table stays a plain table until distributeInTransaction places it.
 * Citus would otherwise turn it into a Citus-managed local table at once, which it cannot
 * distribute afterwards when the table has an identity column.
 */
export async function prepareMigration(client: Query): Promise<void> {
  await client.query('SET LOCAL citus.enable_local_reference_table_foreign_keys = off');
  // Distributing a table in a transaction needs sequential mode from its start: a migration that
  // first copies rows between distributed tables in parallel could not distribute afterwards.
  await client.query(`SET LOCAL citus.multi_shard_modify_mode = 'sequential'`);
}

/** Public tables still local on the coordinator (Citus-managed local tables included). */
export async function localTables(db: Query): Promise<string[]> {
  const tables = await publicTables(db);
  return tables
    .filter((t) => t.method === null || (t.method === 'n' && !t.reference && !t.singleShard))
    .map((t) => t.name);
}
