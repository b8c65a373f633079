// The account-wide Stripe call budget (migration 0008), shared by every worker process through one
// row: a GCRA scheduler. Each call reserves the next free slot with one UPDATE ... RETURNING and waits
// (holding nothing) until its slot, so calls reach Stripe evenly spaced at most `rate` per second,
// whatever the number of workers. A 429 halves the shared rate (at most once a second, down to 5%),
// and the rate recovers linearly to the configured one over RECOVERY_SECONDS without a 429.
//
// Why this file is long: the account-wide call budget: its GCRA statements, the 429 slow-down and recovery
// and the budgeted caller share one row's arithmetic.
import { type Kysely, type RawBuilder, sql } from 'kysely';
import { stripeCallsPerSecond } from '../billing/limits.js';
import type { DB, Destination } from '../db/schema.js';
import type { NodeConnections } from './citus-nodes.js';

/** Each destination has its own budget row (0008, 0024): Stripe's limits and Metronome's are separate. */
export const BUDGET_ROW: Readonly<Record<Destination, number>> = { stripe: 1, metronome: 2 };

/** Time for the shared rate to climb from its floor back to the configured rate after a 429. */
export const BUDGET_RECOVERY_SECONDS = 30;
/** Lowest fraction of the configured rate a 429 storm can push the budget to. */
export const BUDGET_MIN_FACTOR = 0.05;

/** STRIPE_MAX_CALLS_PER_SECOND, or its default for the key's mode (billing/limits.ts). */
export const callsPerSecond = stripeCallsPerSecond;

/**
 * The database clock the budget's statements read. On a distributed Citus database, where the row is
 * a single-shard table, Citus refuses a volatile function in an UPDATE: there the statement's start
 * time stands in (each budget statement is its own transaction, so it is the same instant but for a
 * wait on the row's lock).
 */
export function budgetClock(distributed: boolean) {
  return distributed ? sql`statement_timestamp()` : sql`clock_timestamp()`;
}

/**
 * `at` + `seconds`, as arithmetic on UTC wall time: the same instant as timestamptz + interval, but
 * immutable, which Citus requires of expressions over columns in an UPDATE.
 */
export function plusSeconds(at: RawBuilder<unknown>, seconds: RawBuilder<unknown>) {
  return sql`(((${at}) AT TIME ZONE 'UTC') + make_interval(secs => ${seconds})) AT TIME ZONE 'UTC'`;
}

/** The effective rate given the configured one (SQL over meter_call_budget's columns). */
export function effectiveRate(rate: number, clock = budgetClock(false)) {
  return sql`(${rate}::float8 * least(1.0, factor + coalesce(
      extract(epoch FROM ${clock} - last_429_at) / ${BUDGET_RECOVERY_SECONDS}, 1.0)))`;
}

/**
 * Most time ahead a slot may be reserved. Without this bound, reservations made while the rate was
 * low (a 429 storm) or by calls that never happened (a killed worker) would push every later call
 * far into the future; with it, a caller that finds the budget booked further ahead takes nothing
 * and comes back later (its key's job is deferred), holding nothing meanwhile.
 */
export const BUDGET_MAX_WAIT_MS = 2_000;

export interface Reservation {
  /** False: the budget is booked more than maxWaitMs ahead; nothing was taken, try after waitMs. */
  granted: boolean;
  /** Milliseconds from now until the first reserved slot. */
  waitMs: number;
  /** Milliseconds between consecutive reserved slots. */
  spacingMs: number;
  /** Effective calls/s at reservation time. */
  rate: number;
}

/** Reserves `calls` consecutive slots of the shared budget, at most maxWaitMs ahead; one statement. */
export async function reserveCalls(
  db: Kysely<DB>,
  rate: number,
  calls = 1,
  maxWaitMs = BUDGET_MAX_WAIT_MS,
  distributed = false,
  budgetRow = BUDGET_ROW.stripe,
  /** The worker's node connections (CITUS_NODE_ROUTING=on): on Citus the statement goes to the row's node. */
  nodes?: NodeConnections,
): Promise<Reservation> {
  const wait = (now: RawBuilder<unknown>) =>
    sql`greatest(0, ceil((extract(epoch FROM b.tat - ${now}) - ${calls}::float8 / r.rate) * 1000))::int`;
  // On Citus (a single-shard table) the statement's instant is read once, in a materialized CTE, so
  // that every expression of the UPDATE is over columns (see plusSeconds) and the whole statement is
  // one router query that Citus sends to the row's node, where the clock is read.
  // On Citus with CITUS_NODE_ROUTING=on the statement goes to the node that holds the row's shard
  // (citus-nodes.ts, NodeConnections.singleShard): planned there, not on the coordinator; the same router query.
  const result = distributed
    ? await sql<{ wait_ms: number; rate: number }>`
    WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now),
    r AS (SELECT c.now, ${effectiveRate(rate, sql`c.now`)} AS rate FROM meter_call_budget, c WHERE id = ${budgetRow}),
    u AS (
      UPDATE meter_call_budget b
         SET tat = ${plusSeconds(sql`greatest(b.tat, r.now)`, sql`${calls}::float8 / r.rate`)},
             calls = b.calls + ${calls}
        FROM r
       WHERE b.id = ${budgetRow} AND b.tat <= ${plusSeconds(sql`r.now`, sql`${maxWaitMs / 1000}::float8`)}
      RETURNING ${wait(sql`r.now`)} AS wait_ms, r.rate::float8 AS rate)
    SELECT * FROM u`.execute((await nodes?.singleShard('meter_call_budget')) ?? db)
    : await sql<{ wait_ms: number; rate: number }>`
    UPDATE meter_call_budget b
       SET tat = ${plusSeconds(sql`greatest(b.tat, ${budgetClock(false)})`, sql`${calls}::float8 / r.rate`)},
           calls = b.calls + ${calls}
      FROM (SELECT ${effectiveRate(rate, budgetClock(false))} AS rate FROM meter_call_budget WHERE id = ${budgetRow}) r
     WHERE b.id = ${budgetRow} AND b.tat <= ${plusSeconds(budgetClock(false), sql`${maxWaitMs / 1000}::float8`)}
    RETURNING ${wait(budgetClock(false))} AS wait_ms, r.rate::float8 AS rate`.execute(db);
  const row = result.rows[0];
  if (!row) return { granted: false, waitMs: maxWaitMs, spacingMs: 1000 / rate, rate };
  return { granted: true, waitMs: row.wait_ms, spacingMs: 1000 / row.rate, rate: row.rate };
}

/** A 429: every worker slows down (multiplicative decrease, at most once a second). One statement. */
export async function recordRateLimited(
  db: Kysely<DB>,
  rate: number,
  distributed = false,
  budgetRow = BUDGET_ROW.stripe,
): Promise<void> {
  const clock = budgetClock(distributed);
  await sql`
    UPDATE meter_call_budget
       SET factor = CASE WHEN last_429_at > ${clock} - interval '1 second' THEN factor
                         ELSE greatest(${BUDGET_MIN_FACTOR}::float8, ${effectiveRate(rate, clock)} / ${rate} * 0.5) END,
           last_429_at = ${clock},
           rate_limited = rate_limited + 1
     WHERE id = ${budgetRow}`.execute(db);
}

/** Current state for metrics and the dashboard. */
export async function budgetState(
  db: Kysely<DB>,
  rate: number,
  budgetRow = BUDGET_ROW.stripe,
): Promise<{ rate: number; calls: number; rateLimited: number }> {
  const result = await sql<{ rate: number; calls: string; rate_limited: string }>`
    SELECT ${effectiveRate(rate)} AS rate, calls::text, rate_limited::text FROM meter_call_budget WHERE id = ${budgetRow}`.execute(
    db,
  );
  const row = result.rows[0];
  return {
    rate: Number(row?.rate ?? rate),
    calls: Number(row?.calls ?? 0),
    rateLimited: Number(row?.rate_limited ?? 0),
  };
}

/** A process's share of the budget: slots reserved a few at a time and handed out locally. */
export interface CallSlots {
  /**
   * One call's slot: wait `waitMs` then call; not granted: the budget is booked too far ahead. A call
   * of `events` events takes what they need at the budget's events per second (limits.ts slotsPerCall).
   */
  take(events?: number): Promise<Pick<Reservation, 'granted' | 'waitMs'>>;
  /**
   * One call's turn, waited for: resolves when the call may be made (granted, waitMs 0) or not granted
   * (the budget is booked too far ahead). Calls wait in order; slots that pass while the process is
   * busy or frozen are dropped, never the calls, so a late wake-up releases at most LATE_SLOT_MS of
   * slots at once (`onLate` counts such wake-ups). The dispenser has it; a test's fake need not.
   */
  acquire?(events?: number, onLate?: () => void): Promise<Pick<Reservation, 'granted' | 'waitMs'>>;
}

/** A process reserves about this much of the budget's time at once. */
const SLOT_CHUNK_MS = 100;
const MAX_SLOTS_PER_CHUNK = 50;
/** A local slot this far in the past was not used in time: dropped (the budget is not exceeded). */
const STALE_SLOT_MS = 25;

/**
 * A call is made at its slot or not on it. Slots more than this in the past when the process wakes (an
 * event loop busy with other calls, a CPU-starved or frozen process) are dropped: calls made on them
 * would bunch with the calls of the slots after them, and a second of them would exceed the rate the
 * budget row keeps (at 800 calls/s on a loaded machine timers wake 35-54 ms late at the median and
 * 455 ms at p99; a 100 ms tolerance still let the emulator answer 429s).
 */
export const LATE_SLOT_MS = STALE_SLOT_MS;

/**
 * Every call reserving its own slot made the budget row the hottest lock of the database: 1,602
 * reservations cost 7.7 s of Postgres time (4.8 ms each, queued behind each other's commit) in
 * `npm run bench -- --scale --profile`. A process now reserves ~100 ms of the rate in one statement
 * (up to 50 consecutive slots, as GCRA spaces them) and hands that time to its calls in order, each
 * taking one slot or, for a call of many events under an events budget, the slots its events need
 * (`eventsPerSecond`: limits.ts slotsPerCall). The account-wide rate holds as before; reserved time
 * nobody takes in time is dropped, never moved later.
 * `now` is the host's clock, not the application Clock: slots are waited for with timers and spaced
 * by the database's clock_timestamp(), so a moved test clock must not shift them.
 */
export function createSlotDispenser(
  db: Kysely<DB>,
  rate: number,
  options: {
    /** The host's clock (default Date.now). */
    now?: () => number;
    /** A distributed Citus database: the reservation in Citus's shape (reserveCalls). */
    distributed?: boolean;
    budgetRow?: number;
    /** The row's events budget (limits.ts), or null: one slot a call. */
    eventsPerSecond?: number | null;
    sleep?: (ms: number) => Promise<void>;
    /** The worker's node connections: on Citus the reservations go to the row's node. */
    nodes?: NodeConnections;
  } = {},
): CallSlots {
  const now = options.now ?? Date.now;
  const distributed = options.distributed ?? false;
  const budgetRow = options.budgetRow ?? BUDGET_ROW.stripe;
  const eventsPerSecond = options.eventsPerSecond ?? null;
  const sleep = options.sleep ?? ((ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms)));
  // The reserved time not handed out yet, on the host's clock: [cursor, end), `spacing` ms a slot.
  let cursor = 0;
  let end = 0;
  let spacing = 1000 / rate;
  let refill: Promise<Pick<Reservation, 'granted' | 'waitMs'>> | undefined;
  const chunk = Math.max(1, Math.min(MAX_SLOTS_PER_CHUNK, Math.round((rate * SLOT_CHUNK_MS) / 1000)));
  const unitsOf = (events: number) =>
    eventsPerSecond === null ? 1 : Math.max(1, (Math.max(1, events) * rate) / eventsPerSecond);
  /** Rounding slack: a call that needs the window's exact remainder fits it. */
  const EPSILON_MS = 1e-6;

  const reserve = async (units: number) => {
    const n = Math.max(chunk, Math.ceil(units - EPSILON_MS));
    const r = await reserveCalls(db, rate, n, BUDGET_MAX_WAIT_MS, distributed, budgetRow, options.nodes);
    if (r.granted) {
      // What was left of the previous window is too little for the call that asked: dropped.
      cursor = now() + r.waitMs;
      spacing = r.spacingMs;
      end = cursor + n * spacing;
    }
    return { granted: r.granted, waitMs: r.waitMs };
  };

  // acquire's callers, in order, and the one loop that releases them at their slots.
  const waiting: {
    units: number;
    onLate: (() => void) | undefined;
    resolve: (r: Pick<Reservation, 'granted' | 'waitMs'>) => void;
    reject: (err: unknown) => void;
  }[] = [];
  let pumping = false;
  const pump = async () => {
    if (pumping) return;
    pumping = true;
    try {
      while (waiting.length > 0) {
        const head = waiting[0]!;
        const t = now();
        // Slots that passed more than STALE_SLOT_MS ago (a busy or frozen process) are dropped here.
        cursor = Math.max(cursor, t - STALE_SLOT_MS);
        if (end - cursor < head.units * spacing - EPSILON_MS) {
          refill ??= reserve(head.units).finally(() => {
            refill = undefined;
          });
          const r = await refill;
          // Booked too far ahead: every caller waiting now would be refused the same.
          if (!r.granted) for (const w of waiting.splice(0)) w.resolve(r);
          continue;
        }
        if (cursor > t) {
          const target = cursor;
          await sleep(target - t);
          if (now() - target > LATE_SLOT_MS) head.onLate?.();
          continue;
        }
        cursor += head.units * spacing;
        waiting.shift();
        head.resolve({ granted: true, waitMs: 0 });
      }
    } catch (err) {
      // The reservation's statement failed: the calls waiting now fail with it, as a take() would.
      for (const w of waiting.splice(0)) w.reject(err);
    } finally {
      pumping = false;
    }
  };

  return {
    acquire(events = 1, onLate) {
      return new Promise((resolve, reject) => {
        waiting.push({ units: unitsOf(events), onLate, resolve, reject });
        void pump();
      });
    },
    async take(events = 1) {
      const units = unitsOf(events);
      for (;;) {
        const t = now();
        cursor = Math.max(cursor, t - STALE_SLOT_MS);
        if (end - cursor >= units * spacing - EPSILON_MS) {
          const at = cursor;
          cursor += units * spacing;
          return { granted: true, waitMs: Math.max(0, Math.ceil(at - t)) };
        }
        refill ??= reserve(units).finally(() => {
          refill = undefined;
        });
        const r = await refill;
        if (!r.granted) return r;
      }
    },
  };
}

/** A caller of a destination's API outside delivery (reconciliation, a reconciled redrive). */
export interface BudgetedCaller {
  /** Waits for a slot of the destination's budget (and the caller's own pace), then calls `fn`. */
  call<T>(fn: () => Promise<T>): Promise<T>;
  /** Calls made through this caller so far. */
  readonly calls: number;
}

/**
 * Calls that are not deliveries but go to the same account (Stripe's meter event summaries,
 * Metronome's usage query) take their slots from the destination's budget row like delivery's, so
 * together they never exceed the rate the row allows and never push delivery into 429s. On top,
 * the caller keeps its own pace: at most `share` of the budget's effective rate and at most
 * `maxPerSecond` (an endpoint's own limit: Stripe's reads count against its global limit of 100/s
 * live and a default of 25/s per endpoint, not against the meter-event limit), so delivery keeps
 * the rest of the budget. Slots are reserved a few at a time, never more than one tenth of a
 * second of the caller's pace, so no reserved slot is wasted for long.
 */
export function createBudgetedCaller(
  db: Kysely<DB>,
  options: {
    /** The budget row's configured rate (STRIPE_MAX_CALLS_PER_SECOND or Metronome's). */
    rate: number;
    budgetRow: number;
    share: number;
    maxPerSecond: number;
    distributed?: boolean;
    now?: () => number;
    sleep?: (ms: number) => Promise<void>;
  },
): BudgetedCaller {
  // Host clock and timers, as createSlotDispenser: the slots are spaced by the database's clock.
  const now = options.now ?? Date.now;
  const sleep = options.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const pace = () => Math.max(0.1, Math.min(options.maxPerSecond, options.share * options.rate));
  const chunk = Math.max(1, Math.min(MAX_SLOTS_PER_CHUNK, Math.floor((pace() * SLOT_CHUNK_MS) / 1000)));
  const slots: number[] = [];
  let notBefore = 0;
  let refill: Promise<void> | undefined;
  let calls = 0;

  /** Calls waiting for a slot: a reservation takes no more than they use (a slot nobody takes is lost to delivery). */
  let waiting = 0;
  const reserve = async () => {
    const n = Math.max(1, Math.min(chunk, waiting));
    const r = await reserveCalls(
      db,
      options.rate,
      n,
      BUDGET_MAX_WAIT_MS,
      options.distributed === true,
      options.budgetRow,
    );
    if (!r.granted) {
      notBefore = now() + r.waitMs;
      return;
    }
    const first = now() + r.waitMs;
    for (let i = 0; i < n; i++) slots.push(first + i * r.spacingMs);
    // The caller's own pace, from the rate in force now (a 429 elsewhere slows it too).
    const own = Math.max(0.1, Math.min(options.maxPerSecond, options.share * r.rate));
    notBefore = first + (n * 1000) / own;
  };

  const take = async () => {
    waiting += 1;
    try {
      await takeSlot();
    } finally {
      waiting -= 1;
    }
  };

  const takeSlot = async () => {
    for (;;) {
      const t = now();
      while (slots.length > 0 && slots[0]! < t - STALE_SLOT_MS) slots.shift();
      const next = slots.shift();
      if (next !== undefined) {
        if (next > t) await sleep(next - t);
        // Woken late (a busy or starved process): this slot is dropped and the next one taken, as the
        // dispenser's acquire drops passed slots (the caller's pace, below, keeps it from spinning).
        if (now() - next > LATE_SLOT_MS) continue;
        return;
      }
      if (t < notBefore) {
        await sleep(notBefore - t);
        continue;
      }
      refill ??= reserve().finally(() => {
        refill = undefined;
      });
      await refill;
    }
  };

  return {
    async call(fn) {
      await take();
      calls += 1;
      return fn();
    },
    get calls() {
      return calls;
    },
  };
}

/**
 * Stripe Connect: the budget row of a connected account (migration 0055), created on its first use.
 * Stripe counts a connected account's meter events toward that account's own basic limit, so each
 * account has its own row, shared by every worker like the platform's. One statement when it exists.
 */
export async function connectedBudgetRow(db: Kysely<DB>, account: string): Promise<number> {
  const found = await sql<{ id: number }>`
    SELECT id FROM meter_call_budget WHERE stripe_account = ${account}`.execute(db);
  if (found.rows[0]) return found.rows[0].id;
  await sql`
    INSERT INTO meter_call_budget (id, stripe_account)
    VALUES (nextval('meter_call_budget_account_ids'), ${account})
    ON CONFLICT (stripe_account) DO NOTHING`.execute(db);
  const row = await sql<{ id: number }>`
    SELECT id FROM meter_call_budget WHERE stripe_account = ${account}`.execute(db);
  if (!row.rows[0]) throw new Error(`no budget row for connected account ${account}`);
  return row.rows[0].id;
}

/** A budgeted caller on one Stripe account's budget row, with what a 429 there needs. */
export interface AccountCaller {
  caller: BudgetedCaller;
  /** The row's configured rate. */
  rate: number;
  budgetRow: number;
}

/** Budgeted callers per Stripe account: the platform's row, and each connected account's own. */
export interface AccountCallers {
  /** null: the platform's; a connected account's caller is made (and its row created) on first use. */
  of(account: string | null): Promise<AccountCaller>;
  /** Calls made through every caller so far. */
  readonly calls: number;
}

/**
 * Reads that are not deliveries (meter event summaries, a connected account's meter list) count at
 * Stripe against the account they are made on: a connected account's against its own basic limit. So
 * each connected account's reads take slots of its own budget row (connectedBudgetRow), paced like the
 * platform's (`share` of the row's rate, at most `maxPerSecond`), and never the platform's.
 */
export function createAccountCallers(
  db: Kysely<DB>,
  options: {
    /** The platform's configured rate (STRIPE_MAX_CALLS_PER_SECOND). */
    rate: number;
    /** A connected account's configured rate (STRIPE_CONNECTED_MAX_CALLS_PER_SECOND or its default). */
    connectedRate: number;
    share: number;
    maxPerSecond: number;
    distributed?: boolean;
    /** The platform's caller when the caller already has one (its calls are counted here too). */
    platform?: BudgetedCaller;
  },
): AccountCallers {
  const make = (rate: number, budgetRow: number): AccountCaller => ({
    rate,
    budgetRow,
    caller: createBudgetedCaller(db, {
      rate,
      budgetRow,
      share: options.share,
      maxPerSecond: options.maxPerSecond,
      distributed: options.distributed === true,
    }),
  });
  const platform: AccountCaller = options.platform
    ? { caller: options.platform, rate: options.rate, budgetRow: BUDGET_ROW.stripe }
    : make(options.rate, BUDGET_ROW.stripe);
  const connected = new Map<string, Promise<AccountCaller>>();
  const made: AccountCaller[] = [];
  return {
    of(account) {
      if (account === null) return Promise.resolve(platform);
      let found = connected.get(account);
      if (!found) {
        found = connectedBudgetRow(db, account).then((row) => {
          const c = make(options.connectedRate, row);
          made.push(c);
          return c;
        });
        // A failed lookup is not remembered: the next read asks again.
        found.catch(() => connected.delete(account));
        connected.set(account, found);
      }
      return found;
    },
    get calls() {
      return made.reduce((n, c) => n + c.caller.calls, platform.caller.calls);
    },
  };
}
