// Reading usage back: POST /v1/usage (aggregates per customer, billable metric and hour, day or whole
// range, paginated with next_page) and POST /v1/events/search (events of the last 34 days by
// transaction_id, with the customer and metrics they matched and whether they were duplicates).
import { type MetricSelection, matches, usageRows, type WindowSize } from '../aggregate.js';
import { billableMetricView, findBillableMetric } from '../billable-metrics.js';
import { handle } from '../endpoint.js';
import { badRequest, tooManyRequests } from '../errors.js';
import { type App, parseJson } from '../http.js';
import { DEDUPE_WINDOW_MS } from '../options.js';
import { paginate } from '../pagination.js';
import { parseRfc3339 } from '../rules.js';
import type { Runtime } from '../runtime.js';
import type { Customer, EmulatorState, IngestedEvent } from '../state.js';

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

function requiredTime(body: Record<string, unknown>, field: string): number {
  const value = body[field];
  const ms = typeof value === 'string' ? parseRfc3339(value) : undefined;
  if (ms === undefined) throw badRequest(`${field} is required and must be an RFC 3339 date-time`);
  return ms;
}

function parseUsageQuery(body: unknown, state: EmulatorState) {
  if (!isObject(body)) throw badRequest('Request body must be a JSON object');
  const startingOn = requiredTime(body, 'starting_on');
  const endingBefore = requiredTime(body, 'ending_before');
  if (endingBefore <= startingOn) throw badRequest('ending_before must be after starting_on');
  // Metronome accepts hour, HOUR and Hour (likewise day and none).
  const size = typeof body.window_size === 'string' ? body.window_size.toUpperCase() : '';
  if (size !== 'HOUR' && size !== 'DAY' && size !== 'NONE')
    throw badRequest('window_size must be one of hour, day, none');

  let customers: Customer[];
  if (body.customer_ids === undefined) {
    customers = [...state.customers.values()];
  } else {
    if (!Array.isArray(body.customer_ids) || !body.customer_ids.every((id) => typeof id === 'string'))
      throw badRequest('customer_ids must be an array of strings');
    // Ids of no customer have no usage: they add no rows.
    customers = (body.customer_ids as string[])
      .map((id) => state.customers.get(id))
      .filter((c): c is Customer => c !== undefined);
  }

  let metrics: MetricSelection[];
  if (body.billable_metrics === undefined) {
    metrics = [...state.metrics.values()].filter((m) => m.archivedAt === null).map((metric) => ({ metric }));
  } else {
    if (!Array.isArray(body.billable_metrics)) throw badRequest('billable_metrics must be an array');
    metrics = body.billable_metrics.map((raw: unknown, i) => {
      if (!isObject(raw) || typeof raw.id !== 'string')
        throw badRequest(`billable_metrics[${i}].id is required`);
      const metric = findBillableMetric(state, raw.id);
      if (raw.group_by === undefined) return { metric };
      const g = raw.group_by;
      if (!isObject(g) || typeof g.key !== 'string')
        throw badRequest(`billable_metrics[${i}].group_by.key is required`);
      if (
        g.values !== undefined &&
        (!Array.isArray(g.values) || !g.values.every((v) => typeof v === 'string'))
      )
        throw badRequest(`billable_metrics[${i}].group_by.values must be an array of strings`);
      return { metric, groupBy: { key: g.key, ...(g.values ? { values: g.values as string[] } : {}) } };
    });
  }
  return { startingOn, endingBefore, windowSize: size as WindowSize, customers, metrics };
}

function searchView(state: EmulatorState, event: IngestedEvent, duplicate: boolean) {
  const customer = state.resolve(event.customer_id);
  // The metrics that count it, by the same rule as the usage query.
  const matched = [...state.metrics.values()].filter((m) => matches(m, event));
  return {
    id: event.id,
    customer_id: event.customer_id,
    event_type: event.event_type,
    timestamp: event.timestamp,
    transaction_id: event.transaction_id,
    properties: { ...event.properties },
    is_duplicate: duplicate,
    processed_at: new Date(event.receivedAt).toISOString(),
    ...(customer ? { matched_customer: { id: customer.id, name: customer.name } } : {}),
    matched_billable_metrics: matched.map(billableMetricView),
  };
}

export function registerUsageRoutes(app: App, rt: Runtime): void {
  app.post('/v1/usage', (c) =>
    handle(rt, c, 'usage', 'POST /v1/usage', ({ raw }) => {
      const body = parseJson(raw);
      const query = parseUsageQuery(body, rt.state);
      const rows = usageRows(query, rt.state.events, (id) => rt.state.resolve(id));
      return { status: 200, body: paginate(rows, rt.usagePageSize, c.req.query('next_page'), raw) };
    }),
  );

  app.post('/v1/events/search', (c) =>
    handle(rt, c, 'search', 'POST /v1/events/search', ({ raw }) => {
      const body = parseJson(raw);
      const now = rt.clock();
      if (!rt.searchLimiter.take(now)) throw tooManyRequests();
      const ids = isObject(body) ? body.transactionIds : undefined;
      if (!Array.isArray(ids) || ids.length === 0 || !ids.every((id) => typeof id === 'string'))
        throw badRequest('transactionIds must be a non-empty array of strings');
      const wanted = new Set(ids as string[]);
      // Search covers events that occurred within the last 34 days.
      const recent = (e: IngestedEvent) =>
        wanted.has(e.transaction_id) && now - e.timestampMs <= DEDUPE_WINDOW_MS;
      const found = [
        ...rt.state.events.filter(recent).map((e) => ({ e, duplicate: false })),
        ...rt.state.duplicates.filter(recent).map((e) => ({ e, duplicate: true })),
      ].sort((a, b) => a.e.receivedAt - b.e.receivedAt);
      return { status: 200, body: found.map(({ e, duplicate }) => searchView(rt.state, e, duplicate)) };
    }),
  );
}
