// A destination's outage, handled as one (migration 0035): when every call to a destination fails
// (5xx, timeouts, connection errors, from several groups), delivery stops spending each group's
// attempts and backoff on it. The destination is `down`; groups wait on it instead of backing off on
// their own; one probe call at a time, spaced 2 s, 4 s, 8 s… up to DESTINATION_PROBE_MAX_SECONDS on the
// database's clock, finds out when it is back; the first answer that shows it working marks it `up`
// and wakes every waiting group's job at once. A `Retry-After` it sends (429, 503) holds every call to
// it until then. The state is one row per destination and account (Stripe Connect: a connected
// account's outage is its own) shared by every worker process; the decisions on it (the next state,
// the gate's split of a batch's calls) are pure functions in rules/health.ts, the statements here.
// Stripe Connect: a connected account that refuses the platform access (deauthorized it: 403
// `account_invalid`, or the `account.application.deauthorized` webhook) is held at once, on its first
// refusal (migration 0071): its row is down with access_refused_since set, its groups wait uncounted,
// and it is probed more sparsely (5 s doubling to CONNECT_ACCESS_PROBE_MAX_SECONDS) until a call is
// accepted or `account.application.authorized` arrives; then its backlog goes out. Stripe refusing the
// platform's own key (a 401 without Stripe-Account, migration 0075) holds the platform's row the same
// way: Stripe delivery waits uncounted and is probed until the key works again.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { Metrics } from '../observability/metrics.js';
import { plusSeconds } from './budget.js';
import { type Placement, perShardGroup, routerOf } from './delivery-sql-shapes.js';
import { queueDeliveries } from './outbox.js';
import {
  type Gate,
  type HealthOutcome,
  type HealthPolicy,
  type HealthReport,
  nextHealth,
  PROBE_HOLD_MS,
} from './rules/health.js';
import { type KeyRef, keyRef, singletonKeyOf } from './rules/keys.js';

/**
 * The row of a destination and account: '' the destination's own; Stripe Connect: a connected
 * account's (acct_…), whose outage is its own — its groups wait on it while the platform's customers
 * keep being delivered.
 */
const ROW = (destination: Destination, account: string) =>
  sql`destination = ${destination} AND account = ${account}`;

/** A connected account's row is made on its first failure (the destinations' own rows: migration 0035). */
async function ensureRow(db: Kysely<DB>, destination: Destination, account: string): Promise<void> {
  if (account === '') return;
  await sql`
    INSERT INTO destination_health (destination, account) VALUES (${destination}, ${account})
    ON CONFLICT (destination, account) DO NOTHING`.execute(db);
}

/**
 * ONE statement before a batch's calls: open; or wait (a Retry-After not yet over, or down with the
 * probe slot taken or not yet due); or the probe slot, taken here (next_probe_at moves PROBE_HOLD_MS
 * ahead until the probe's answer is recorded). Reads only, unless it takes the probe slot.
 */
export async function gateCalls(db: Kysely<DB>, destination: Destination, account = ''): Promise<Gate> {
  const { rows } = await sql<{
    state: 'up' | 'down';
    probe: boolean;
    failures: number;
    retry_after_ms: number;
    probe_in_ms: number;
    held: boolean;
  }>`
    WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now),
    p AS (
      UPDATE destination_health h
         SET next_probe_at = ${plusSeconds(sql`c.now`, sql`${PROBE_HOLD_MS / 1000}::float8`)},
             probes = h.probes + 1, updated_at = c.now
        FROM c
       WHERE ${ROW(destination, account)} AND h.state = 'down'
         AND (h.next_probe_at IS NULL OR h.next_probe_at <= c.now)
         AND (h.retry_after_until IS NULL OR h.retry_after_until <= c.now)
      RETURNING 1)
    SELECT h.state, EXISTS (SELECT 1 FROM p) AS probe, h.failures, h.access_refused_since IS NOT NULL AS held,
           greatest(0, ceil(extract(epoch FROM coalesce(h.retry_after_until, c.now) - c.now) * 1000))::int AS retry_after_ms,
           greatest(0, ceil(extract(epoch FROM coalesce(h.next_probe_at, c.now) - c.now) * 1000))::int AS probe_in_ms
      FROM destination_health h, c
     WHERE ${ROW(destination, account)}`.execute(db);
  const row = rows[0];
  if (!row) return { kind: 'open', failures: 0 };
  if (row.retry_after_ms > 0) return { kind: 'wait', reason: 'retry_after', waitMs: row.retry_after_ms };
  if (row.state === 'up') return { kind: 'open', failures: row.failures };
  const held = row.held ? { held: true } : {};
  if (row.probe) return { kind: 'probe', ...held };
  return { kind: 'wait', reason: 'down', waitMs: Math.max(1, row.probe_in_ms), ...held };
}

// ─── the record after a batch's calls ───────────────────────────────────────────────────────────

/**
 * A batch's report on the destination. Answers only (the steady state): one UPDATE that writes
 * nothing unless a run of failures or an outage is to be ended. Failures: the row is read and written
 * in one transaction (its lock orders the batches of every worker), the next state from nextHealth.
 */
export async function recordHealth(
  db: Kysely<DB>,
  destination: Destination,
  report: HealthReport,
  policy: Pick<HealthPolicy, 'downAfterFailures' | 'downAfterKeys' | 'probeMaxMs' | 'accessProbeMaxMs'>,
  account = '',
  /** Stripe's message of an access refusal in the report (kept on the row for the operator). */
  refusal?: string,
): Promise<HealthOutcome> {
  if (report.answered > 0) {
    const { rows } = await sql<{ was: 'up' | 'down' }>`
      UPDATE destination_health h
         SET state = 'up', down_since = NULL, failures = 0, failing_keys = '{}', next_probe_at = NULL,
             probes = 0, access_refused_since = NULL, access_refused_message = NULL, updated_at = now()
        -- Unlocked: a batch that finds nothing to end writes nothing and takes no lock (the steady
        -- state). Two batches ending one outage: the second finds it ended (EvalPlanQual) and skips.
        FROM (SELECT state AS was FROM destination_health WHERE ${ROW(destination, account)}) o
       WHERE ${ROW(destination, account)} AND (h.failures > 0 OR h.state = 'down')
      RETURNING o.was`.execute(db);
    return { state: 'up', probeInMs: 0, recovered: rows[0]?.was === 'down', wentDown: false, refused: false };
  }
  if (report.failures === 0 && (report.refused ?? 0) === 0) {
    const { rows } = await sql<{ state: 'up' | 'down'; probe_in_ms: number }>`
      SELECT state, greatest(0, ceil(extract(epoch FROM coalesce(next_probe_at, now()) - clock_timestamp()) * 1000))::int AS probe_in_ms
        FROM destination_health WHERE ${ROW(destination, account)}`.execute(db);
    return {
      state: rows[0]?.state ?? 'up',
      probeInMs: rows[0]?.probe_in_ms ?? 0,
      recovered: false,
      wentDown: false,
      refused: false,
    };
  }
  await ensureRow(db, destination, account);
  return db.transaction().execute(async (trx) => {
    const { rows } = await sql<{
      state: 'up' | 'down';
      down_since: Date | null;
      failures: number;
      failing_keys: string[];
      next_probe_at: Date | null;
      probes: number;
      access_refused_since: Date | null;
      now: Date;
    }>`
      SELECT state, down_since, failures, failing_keys, next_probe_at, probes, access_refused_since,
             clock_timestamp() AS now
        FROM destination_health WHERE ${ROW(destination, account)} FOR UPDATE`.execute(trx);
    const current = rows[0];
    if (!current) {
      return { state: 'up' as const, probeInMs: 0, recovered: false, wentDown: false, refused: false };
    }
    const now = new Date(current.now);
    const next = nextHealth(
      {
        state: current.state,
        downSince: current.down_since,
        failures: current.failures,
        failingKeys: current.failing_keys,
        nextProbeAt: current.next_probe_at,
        probes: current.probes,
        accessRefusedSince: current.access_refused_since,
      },
      // A connected account's refusal of the platform, or (account '') Stripe's of the platform's key.
      report,
      now,
      policy,
    );
    const r = next.row;
    await sql`
      UPDATE destination_health
         SET state = ${r.state}, down_since = ${r.downSince}, failures = ${r.failures},
             failing_keys = ${r.failingKeys}::text[], next_probe_at = ${r.nextProbeAt}, probes = ${r.probes},
             access_refused_since = ${r.accessRefusedSince},
             access_refused_message = CASE WHEN ${r.accessRefusedSince}::timestamptz IS NULL THEN NULL
                                           ELSE coalesce(${refusal ?? null}, access_refused_message) END,
             outages = outages + ${next.wentDown ? 1 : 0}, updated_at = ${now}
       WHERE ${ROW(destination, account)}`.execute(trx);
    return {
      state: r.state,
      probeInMs: r.nextProbeAt ? Math.max(0, r.nextProbeAt.getTime() - now.getTime()) : 0,
      recovered: false,
      wentDown: next.wentDown,
      refused: next.refused,
    };
  });
}

/**
 * A worker starting with its Stripe key while Stripe refuses the platform's key (PLATFORM_KEY_REFUSED):
 * this process may carry the fixed key, so the hold's next probe is due now, not up to
 * CONNECT_ACCESS_PROBE_MAX_SECONDS later. Returns whether the platform's Stripe delivery was held.
 */
export async function probeKeyHoldNow(db: Kysely<DB>): Promise<boolean> {
  // The clock read once in a materialized CTE: Citus refuses a volatile function in an UPDATE.
  const { rows } = await sql<{ held: number }>`
    WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
    UPDATE destination_health SET next_probe_at = c.now, updated_at = c.now
      FROM c
     WHERE ${ROW('stripe', '')} AND access_refused_since IS NOT NULL
    RETURNING 1 AS held`.execute(db);
  return rows.length > 0;
}

/** Whether the destination may be called now: up, and no Retry-After in force. */
export async function callable(db: Kysely<DB>, destination: Destination, account = ''): Promise<boolean> {
  const { rows } = await sql<{ ok: boolean }>`
    SELECT state = 'up' AND (retry_after_until IS NULL OR retry_after_until <= clock_timestamp()) AS ok
      FROM destination_health WHERE ${ROW(destination, account)}`.execute(db);
  return rows[0]?.ok ?? true;
}

/** A destination's Retry-After: no call to it before `ms` from now (the later of two such asks). */
export async function recordRetryAfter(
  db: Kysely<DB>,
  destination: Destination,
  ms: number,
  account = '',
): Promise<void> {
  await ensureRow(db, destination, account);
  // The clock read once in a materialized CTE and added to with immutable arithmetic: Citus refuses
  // a volatile function in an UPDATE.
  await sql`
    WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
    UPDATE destination_health
       SET retry_after_until = greatest(coalesce(retry_after_until, '-infinity'),
                                        ${plusSeconds(sql`c.now`, sql`${ms / 1000}::float8`)}),
           updated_at = c.now
      FROM c
     WHERE ${ROW(destination, account)}`.execute(db);
}

// ─── the end of an outage ───────────────────────────────────────────────────────────────────────

/**
 * The destination is back: every key of it that waits (its retry_at ahead: waiting on the outage, or
 * backing off from failures that were the destination's) may call now, and its queued job starts now
 * instead of at its backoff's end; a key without a queued job gets one. Two statements and a queue
 * insert; returns the keys resumed.
 */
export async function resumeWaiting(
  db: Kysely<DB>,
  boss: PgBoss,
  destination: Destination,
  /** Only these keys (a batch's own, told to wait just as the outage ended); default every key. */
  only?: readonly KeyRef[],
  /** Stripe Connect: the keys of this connected account's customers ('': the platform's own). */
  account = '',
  placement: Placement = {},
): Promise<KeyRef[]> {
  const ofAccount =
    destination !== 'stripe'
      ? sql``
      : account === ''
        ? sql`AND NOT EXISTS (SELECT 1 FROM stripe_customer_accounts a
                               WHERE a.stripe_customer_id = meter_delivery_keys.stripe_customer_id)`
        : sql`AND stripe_customer_id IN (SELECT stripe_customer_id FROM stripe_customer_accounts
                                          WHERE stripe_account = ${account})`;
  const filter = only
    ? sql`AND (organization_id, stripe_customer_id, event_name) IN (
            SELECT * FROM unnest(${only.map((k) => k.organizationId)}::uuid[], ${only.map((k) => k.customerId)}::text[],
                                 ${only.map((k) => k.eventName)}::text[]))`
    : sql``;
  const waiting = sql`destination = ${destination} AND retry_at > now() ${filter} ${ofAccount}`;
  const statement = (orgs: readonly string[] | null) => sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
  }>`
    WITH w AS (
      -- In key order, as every statement that locks several keys (the claim, the settle): no deadlock.
      SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
       WHERE ${orgs ? sql`organization_id = ANY(${[...orgs]}::uuid[]) AND ` : sql``} ${waiting}
       ORDER BY 1, 2, 3, 4
         FOR UPDATE)
    UPDATE meter_delivery_keys d SET retry_at = NULL
      FROM w
     WHERE ${orgs ? sql`d.organization_id = ANY(${[...orgs]}::uuid[]) AND ` : sql``}
           d.organization_id = w.organization_id AND d.stripe_customer_id = w.stripe_customer_id
       AND d.event_name = w.event_name AND d.destination = w.destination AND d.retry_at > now()
    RETURNING d.organization_id, d.stripe_customer_id AS customer, d.event_name`;
  // On Citus: the organizations with waiting keys read first (every shard, no lock), then the
  // statement per shard group, each a router statement that locks rows on one node only.
  const rows = !placement.distributed
    ? (await statement(null).execute(db)).rows
    : await perShardGroup(
        routerOf(db, { ...placement, distributed: true }),
        (
          await sql<{ organization_id: string }>`
            SELECT DISTINCT organization_id FROM meter_delivery_keys WHERE ${waiting}`.execute(db)
        ).rows.map((r) => r.organization_id),
        (o) => o,
        async (_, orgs) => (await statement(orgs).execute(db)).rows,
      );
  const keys = rows.map((r) =>
    keyRef({
      organizationId: r.organization_id,
      customerId: r.customer,
      eventName: r.event_name,
      destination,
    }),
  );
  if (keys.length === 0) return keys;
  // Their follow-up jobs were queued to start at the backoff's end: they start now.
  // In singleton key order, as ingestion locks queued jobs (outbox.ts lockQueuedJobs).
  await sql`
    WITH j AS (
      SELECT id FROM pgboss.job
       WHERE name = 'meter-delivery' AND state IN ('created', 'retry') AND start_after > now()
         AND singleton_key = ANY(${keys.map(singletonKeyOf)}::text[])
       ORDER BY singleton_key
         FOR NO KEY UPDATE)
    UPDATE pgboss.job SET start_after = now() FROM j
     WHERE pgboss.job.name = 'meter-delivery' AND pgboss.job.id = j.id`.execute(db);
  await queueDeliveries(boss, keys);
  return keys;
}

// ─── what the metrics and the dashboard show ────────────────────────────────────────────────────

export interface DestinationHealthState {
  destination: Destination;
  account: string;
  down: boolean;
  /** Seconds since it went down (0 while up), on the database's clock. */
  downSeconds: number;
  /** Seconds until its Retry-After is over (0: none). */
  retryAfterSeconds: number;
  outages: number;
  /** Stripe Connect: the account refuses the platform access; its deliveries are held. */
  accessRefused: boolean;
  /** Seconds since it refused (0 while it does not). */
  accessRefusedSeconds: number;
  /** Stripe's answer (or the webhook) that recorded the hold. */
  accessRefusedMessage: string | null;
}

export async function destinationHealthStates(db: Kysely<DB>): Promise<DestinationHealthState[]> {
  const { rows } = await sql<{
    destination: Destination;
    account: string;
    state: 'up' | 'down';
    down_seconds: number;
    retry_after_seconds: number;
    outages: string;
    access_refused_seconds: number | null;
    access_refused_message: string | null;
  }>`
    SELECT destination, account, state,
           coalesce(extract(epoch FROM now() - down_since), 0)::float8 AS down_seconds,
           extract(epoch FROM now() - access_refused_since)::float8 AS access_refused_seconds,
           access_refused_message,
           greatest(0, coalesce(extract(epoch FROM retry_after_until - now()), 0))::float8 AS retry_after_seconds,
           outages::text
      FROM destination_health ORDER BY destination, account`.execute(db);
  return rows.map((r) => ({
    destination: r.destination,
    account: r.account,
    down: r.state === 'down',
    downSeconds: Math.max(0, r.down_seconds),
    retryAfterSeconds: r.retry_after_seconds,
    outages: Number(r.outages),
    accessRefused: r.access_refused_seconds !== null,
    accessRefusedSeconds: Math.max(0, r.access_refused_seconds ?? 0),
    accessRefusedMessage: r.access_refused_message,
  }));
}

/**
 * meterbox_destination_down and _down_seconds from the table (the destinations' own accounts), and
 * per connected account with a row (bounded by the accounts organizations are linked to)
 * meterbox_connect_account_access_refused and _seconds.
 */
export async function applyDestinationHealthGauges(db: Kysely<DB>, metrics: Metrics): Promise<void> {
  const states = await destinationHealthStates(db);
  const held = await heldRows(
    db,
    states.filter((s) => s.accessRefused).map((s) => s.account),
  );
  for (const s of states) {
    if (s.account !== '') {
      metrics.connectAccountAccessRefused.set({ account: s.account }, s.accessRefused ? 1 : 0);
      metrics.connectAccountAccessRefusedSeconds.set({ account: s.account }, s.accessRefusedSeconds);
      metrics.connectAccountHeldRows.set({ account: s.account }, held.get(s.account) ?? 0);
      continue;
    }
    metrics.destinationKeyRefused.set({ destination: s.destination }, s.accessRefused ? 1 : 0);
    metrics.destinationDown.set({ destination: s.destination }, s.down ? 1 : 0);
    metrics.destinationDownSeconds.set({ destination: s.destination }, s.down ? s.downSeconds : 0);
  }
}

/** Pending Stripe rows of each held account's customers (one statement; none while nothing is held). */
export async function heldRows(db: Kysely<DB>, accounts: readonly string[]): Promise<Map<string, number>> {
  if (accounts.length === 0) return new Map();
  const { rows } = await sql<{ account: string; n: string }>`
    SELECT a.stripe_account AS account, count(*)::text AS n
      FROM meter_outbox o JOIN stripe_customer_accounts a ON a.stripe_customer_id = o.stripe_customer_id
     WHERE o.status = 'pending' AND o.destination = 'stripe' AND a.stripe_account = ANY(${accounts}::text[])
     GROUP BY 1`.execute(db);
  return new Map(rows.map((r) => [r.account, Number(r.n)]));
}
