// What a destination itself counted for one customer and meter, read back through its own API for
// reconciliation: Stripe's meter event summaries, Metronome's usage query. Every call takes a slot
// of the destination's call budget (a BudgetedCaller), and a 429 slows that budget like delivery's.
//
// Granularity, as each destination publishes it:
// - Stripe: GET /v1/billing/meters/{id}/event_summaries takes start_time and end_time "aligned with
//   minute boundaries"; without value_grouping_window it answers one summary for the whole range,
//   with it one per `hour` or `day` (the only two values). So any minute-aligned window can be asked.
// - Metronome: POST /v1/usage takes starting_on / ending_before and window_size `hour`, `day` or
//   `none`; its reference says nothing finer than the hour, and nothing of how unaligned bounds are
//   treated. meterbox therefore asks Metronome about whole UTC hours only: its window is the hour.
import type Metronome from '@metronome/sdk';
import type { Kysely } from 'kysely';
import type Stripe from 'stripe';
import { customerAccount } from '../billing/connect.js';
import { listAccountMeters, METER_SPECS, meterStateOf } from '../billing/stripe-account.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { type AccountCallers, BUDGET_ROW, type BudgetedCaller, recordRateLimited } from './budget.js';
import {
  findCustomer,
  listBillableMetrics,
  METRONOME_ALIAS_PREFIX,
  METRONOME_METRICS,
  metricFor,
} from './metronome.js';
import { RATE_LIMITED_RETRY_MS } from './rules/policy.js';

const MINUTE_MS = 60_000;
const HOUR_MS = 3_600_000;
/** A 429 is retried this many times (after the budget slowed down) before the read counts as failed. */
const RATE_LIMITED_RETRIES = 3;

/** Why the destination could not be asked (no meter, no customer): the window is not compared. */
export class NotAskable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NotAskable';
  }
}

export interface DestinationTotals {
  readonly destination: Destination;
  /** The narrowest window the destination totals on its own: Stripe a minute, Metronome an hour. */
  readonly windowMs: number;
  /**
   * The destination's value per UTC hour (start in ms → value) for one customer and each meter in
   * [from, to), both on hour boundaries. Hours it counted nothing in may be absent; a meter the
   * destination has no counterpart for (no active meter, no billable metric) is absent altogether.
   */
  hourly(
    customerId: string,
    meters: readonly MeterEventName[],
    from: Date,
    to: Date,
  ): Promise<Map<MeterEventName, Map<number, number>>>;
  /** The destination's value for one customer and meter over [from, from + windowMs). */
  window(customerId: string, meter: MeterEventName, from: Date): Promise<number>;
  /** Calls made so far (each took a slot of the destination's budget). */
  readonly calls: number;
}

function statusOf(err: unknown): number | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const e = err as { statusCode?: unknown; status?: unknown };
  const s = typeof e.statusCode === 'number' ? e.statusCode : e.status;
  return typeof s === 'number' ? s : undefined;
}

/** One call through the budget; a 429 slows the shared budget and is retried a few times. */
async function budgeted<T>(
  deps: { db: Kysely<DB>; caller: BudgetedCaller; rate: number; budgetRow: number; distributed: boolean },
  fn: () => Promise<T>,
): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await deps.caller.call(fn);
    } catch (err) {
      if (statusOf(err) !== 429 || attempt >= RATE_LIMITED_RETRIES) throw err;
      await recordRateLimited(deps.db, deps.rate, deps.distributed, deps.budgetRow);
      await new Promise((r) => setTimeout(r, RATE_LIMITED_RETRY_MS));
    }
  }
}

export interface TotalsDeps {
  db: Kysely<DB>;
  caller: BudgetedCaller;
  /** The budget row's configured rate (for the 429 slow-down). */
  rate: number;
  distributed?: boolean;
  /**
   * Stripe Connect: the callers of each connected account's own budget row. A connected customer's
   * summaries count against its account's limit at Stripe, so they take that row's slots; without
   * this they take the platform's (`caller`).
   */
  accounts?: AccountCallers;
}

/** Stripe's meter event summaries; `meterId` gives the active meter of an event name, if any. */
export function stripeTotals(
  stripe: Stripe,
  meterId: (eventName: MeterEventName) => string | undefined,
  deps: TotalsDeps,
): DestinationTotals {
  const call = { ...deps, budgetRow: BUDGET_ROW.stripe, distributed: deps.distributed === true };
  // Stripe Connect: a connected account's customer is summarized on that account (Stripe-Account),
  // through that account's budget row, and with that account's meters (meters are an account's own:
  // the platform's ids name nothing there).
  const accounts = new Map<string, string | null>();
  const accountMeters = new Map<string, Promise<Map<MeterEventName, string>>>();
  const on = async (
    customerId: string,
  ): Promise<{
    options: Stripe.RequestOptions | undefined;
    call: Parameters<typeof budgeted>[0];
    meterId: (eventName: MeterEventName) => Promise<string | undefined>;
  }> => {
    if (!accounts.has(customerId)) accounts.set(customerId, await customerAccount(deps.db, customerId));
    const account = accounts.get(customerId) ?? null;
    if (!account) return { options: undefined, call, meterId: async (e) => meterId(e) };
    const own = deps.accounts ? await deps.accounts.of(account) : undefined;
    const accountCall = own
      ? {
          db: deps.db,
          caller: own.caller,
          rate: own.rate,
          budgetRow: own.budgetRow,
          distributed: call.distributed,
        }
      : call;
    const options = { stripeAccount: account };
    let ids = accountMeters.get(account);
    if (!ids) {
      ids = budgeted(accountCall, () => listAccountMeters(stripe, account)).then((meters) => {
        const found = new Map<MeterEventName, string>();
        for (const spec of METER_SPECS) {
          const state = meterStateOf(spec, meters);
          if (state.kind === 'ok') found.set(spec.eventName, state.meter.id);
        }
        return found;
      });
      ids.catch(() => accountMeters.delete(account));
      accountMeters.set(account, ids);
    }
    const known = ids;
    return { options, call: accountCall, meterId: async (e) => (await known).get(e) };
  };
  return {
    destination: 'stripe',
    windowMs: MINUTE_MS,
    get calls() {
      return deps.accounts ? deps.accounts.calls : deps.caller.calls;
    },
    async hourly(customerId, meters, from, to) {
      const out = new Map<MeterEventName, Map<number, number>>();
      const where = await on(customerId);
      for (const meter of meters) {
        // A meter with no active Stripe meter is held by delivery; it has nothing to compare yet.
        const id = await where.meterId(meter);
        if (!id) continue;
        // One call per customer and meter: the lookback (at most 35 days: 840 hourly summaries) is
        // read in pages of 100, each page its own budgeted call.
        const values = new Map<number, number>();
        const options = where.options;
        let startingAfter: string | undefined;
        for (;;) {
          const page = await budgeted(where.call, () =>
            stripe.billing.meters.listEventSummaries(
              id,
              {
                customer: customerId,
                start_time: Math.floor(from.getTime() / 1000),
                end_time: Math.floor(to.getTime() / 1000),
                value_grouping_window: 'hour',
                limit: 100,
                ...(startingAfter ? { starting_after: startingAfter } : {}),
              },
              options,
            ),
          );
          for (const s of page.data) values.set(s.start_time * 1000, s.aggregated_value);
          const last = page.data.at(-1);
          if (!page.has_more || !last) break;
          startingAfter = last.id;
        }
        out.set(meter, values);
      }
      return out;
    },
    async window(customerId, meter, from) {
      const where = await on(customerId);
      const id = await where.meterId(meter);
      if (!id) throw new NotAskable(`no active Stripe meter is known for ${meter}`);
      const start = Math.floor(from.getTime() / MINUTE_MS) * 60;
      const page = await budgeted(where.call, () =>
        stripe.billing.meters.listEventSummaries(
          id,
          { customer: customerId, start_time: start, end_time: start + 60, limit: 1 },
          where.options,
        ),
      );
      return page.data[0]?.aggregated_value ?? 0;
    },
  };
}

/**
 * Metronome's usage query. Its customers are found by meterbox's ingest alias (one lookup per
 * customer, kept for the life of this reader), its billable metrics by their definition.
 */
export function metronomeTotals(client: Metronome, deps: TotalsDeps): DestinationTotals {
  const call = { ...deps, budgetRow: BUDGET_ROW.metronome, distributed: deps.distributed === true };
  const customers = new Map<string, string>();
  let metrics: Promise<Map<MeterEventName, string>> | undefined;
  const metricIds = () => {
    metrics ??= budgeted(call, () => listBillableMetrics(client)).then((all) => {
      const ids = new Map<MeterEventName, string>();
      for (const spec of METRONOME_METRICS) {
        const m = metricFor(all, spec);
        if (m) ids.set(spec.eventName, m.id);
      }
      return ids;
    });
    return metrics;
  };
  const customerOf = async (alias: string) => {
    const known = customers.get(alias);
    if (known) return known;
    if (!alias.startsWith(METRONOME_ALIAS_PREFIX))
      throw new NotAskable(`${alias} is not an ingest alias meterbox sends under`);
    const found = await budgeted(call, () =>
      findCustomer(client, alias.slice(METRONOME_ALIAS_PREFIX.length)),
    );
    if (!found) throw new NotAskable(`no Metronome customer has the alias ${alias}`);
    customers.set(alias, found.id);
    return found.id;
  };
  const usage = async (alias: string, meters: readonly MeterEventName[], from: Date, to: Date) => {
    const ids = await metricIds();
    const wanted = meters.flatMap((m) => {
      const id = ids.get(m);
      return id ? [{ eventName: m, id }] : [];
    });
    const out = new Map<MeterEventName, Map<number, number>>();
    if (wanted.length === 0) return out;
    for (const m of wanted) out.set(m.eventName, new Map());
    const byId = new Map(wanted.map((m) => [m.id, m.eventName]));
    const customerId = await customerOf(alias);
    // Each page of the usage query is one call, and each takes its own slot.
    let page = await budgeted(call, () =>
      client.v1.usage.list({
        starting_on: from.toISOString(),
        ending_before: to.toISOString(),
        window_size: 'HOUR',
        customer_ids: [customerId],
        billable_metrics: wanted.map((m) => ({ id: m.id })),
      }),
    );
    for (;;) {
      for (const row of page.getPaginatedItems()) {
        const eventName = byId.get(row.billable_metric_id);
        if (!eventName || row.value === null) continue;
        out.get(eventName)?.set(new Date(row.start_timestamp).getTime(), row.value);
      }
      if (!page.hasNextPage()) break;
      const current = page;
      page = await budgeted(call, () => current.getNextPage());
    }
    return out;
  };
  return {
    destination: 'metronome',
    windowMs: HOUR_MS,
    get calls() {
      return deps.caller.calls;
    },
    hourly: (alias, meters, from, to) => usage(alias, meters, from, to),
    async window(alias, meter, from) {
      const start = new Date(Math.floor(from.getTime() / HOUR_MS) * HOUR_MS);
      const ids = await metricIds();
      if (!ids.has(meter)) throw new NotAskable(`no Metronome billable metric counts ${meter}`);
      const values = await usage(alias, [meter], start, new Date(start.getTime() + HOUR_MS));
      return values.get(meter)?.get(start.getTime()) ?? 0;
    },
  };
}
