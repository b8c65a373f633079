// A small fake of Metronome written from its published API reference, apart from the project's own
// emulator (packages/metronome-emulator): a test that runs meterbox against both cannot pass on a
// misreading the emulator and the product share. What it takes from the published pages:
//
// * POST /v1/ingest takes a JSON array of 1 to 100 usage events as its body, each with
//   `transaction_id`, `customer_id` (a customer id or one of its ingest aliases), `event_type`,
//   `timestamp` (RFC 3339, 4-digit year) and `properties`; one invalid event refuses the call (400).
// * "Once a usage event is accepted with a given transaction ID, subsequent events within the next 34
//   days with the same ID are treated as duplicates and ignored" (answered 200, not counted).
// * Backdating is supported up to 34 days; "timestamps more than 24 hours in the future are rejected".
// * An event naming no known customer is kept and attributed once the alias exists (listed here as
//   unmatched: a test expects none).
// * 429 when the account's rate is exceeded; 5xx on a server error.
// * Ingest aliases are unique: creating a customer with an alias in use is a 409.
//
// The rest is the smallest reading of the endpoints meterbox also calls: billable metrics (listed),
// customers (created, listed by alias), the billable status (a schedule of values by `effective_at`),
// the usage query by hour (`POST /v1/usage`, SUM or LATEST of `value`) and invoice breakdowns by hour
// (a flat rate per unit of the SUM metric, FINALIZED a day after the window ends). Faults are drawn per
// ingest call from a seeded stream: a 500 before anything is recorded, a 500 after the events were
// recorded ("accepted, then 500"), a 429 with Retry-After, a connection reset before anything is recorded.
//
// Why this file is long: its first lines quote each published rule it implements; the code under them is short.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { seededRandom } from './random.js';

const DAY_MS = 86_400_000;
const HOUR_MS = 3_600_000;
const DEDUPE_MS = 34 * DAY_MS;
const BACKDATE_MS = 34 * DAY_MS;
const AHEAD_MS = DAY_MS;
const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

export interface FakeFaults {
  /** A 500 before the events are recorded. */
  error500?: number;
  /** The events recorded, then a 500 (the caller cannot tell them from an error500). */
  acceptedThen500?: number;
  /** A 429 with Retry-After: 1. */
  rateLimit429?: number;
  /** The connection destroyed before anything is recorded. */
  reset?: number;
  /** The faults of the next ingest calls, in order, before the random ones ('none': answered as usual). */
  script?: ('error500' | 'acceptedThen500' | 'rateLimit429' | 'reset' | 'none')[];
}

export interface FakeEvent {
  transactionId: string;
  /** What the caller sent as customer_id. */
  sentAs: string;
  /** The Metronome customer it was attributed to; null while no customer has that id or alias. */
  customer: string | null;
  eventType: string;
  timestamp: number;
  value: number;
  receivedAt: number;
}

interface FakeCustomer {
  id: string;
  name: string;
  aliases: string[];
  /** setBillableStatus calls in the order received. */
  billable: { status: 'billable' | 'unbillable'; effectiveAt: number }[];
}

export interface MetronomeFake {
  url: string;
  token: string;
  /** Accepted events (each transaction_id once). */
  events(): FakeEvent[];
  unmatched(): FakeEvent[];
  customerByAlias(alias: string): { id: string; billable: FakeCustomer['billable'] } | undefined;
  setFaults(faults: FakeFaults): void;
  counters(): {
    ingestCalls: number;
    accepted: number;
    duplicates: number;
    error500: number;
    acceptedThen500: number;
    rateLimited: number;
    resets: number;
    refused: number;
  };
  stop(): Promise<void>;
}

class Refusal extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export async function startMetronomeFake(options: {
  seed: number;
  faults?: FakeFaults;
  /** Cents per unit of temperature_readings on the breakdowns (the rate card's one rate). */
  rate: number;
}): Promise<MetronomeFake> {
  const token = `fake-${options.seed}`;
  const random = seededRandom(options.seed);
  let faults: FakeFaults = options.faults ?? {};
  const metrics = [
    { id: 'bm-temperature', name: 'temperature_readings', aggregation_type: 'SUM' },
    { id: 'bm-sensors', name: 'active_sensors', aggregation_type: 'LATEST' },
  ].map((m) => ({
    ...m,
    aggregation_key: 'value',
    event_type_filter: { in_values: [m.name] },
    property_filters: [{ name: 'value', exists: true }],
    group_keys: [],
  }));
  const customers: FakeCustomer[] = [];
  const accepted: FakeEvent[] = [];
  const seen = new Map<string, number>();
  const counters = {
    ingestCalls: 0,
    accepted: 0,
    duplicates: 0,
    error500: 0,
    acceptedThen500: 0,
    rateLimited: 0,
    resets: 0,
    refused: 0,
  };

  const customerOf = (idOrAlias: string) =>
    customers.find((c) => c.id === idOrAlias || c.aliases.includes(idOrAlias));

  const validEvent = (raw: unknown, now: number): Omit<FakeEvent, 'receivedAt'> => {
    if (typeof raw !== 'object' || raw === null) throw new Refusal(400, 'each usage event must be an object');
    const e = raw as Record<string, unknown>;
    for (const field of ['transaction_id', 'customer_id', 'event_type', 'timestamp'])
      if (typeof e[field] !== 'string' || (e[field] as string).length === 0)
        throw new Refusal(400, `${field} is required and must be a string`);
    const timestamp = e.timestamp as string;
    if (!RFC3339.test(timestamp)) throw new Refusal(400, `timestamp ${timestamp} is not an RFC 3339 string`);
    const at = Date.parse(timestamp);
    if (at > now + AHEAD_MS)
      throw new Refusal(400, `timestamp ${timestamp} is more than 24 hours in the future`);
    if (at < now - BACKDATE_MS)
      throw new Refusal(400, `timestamp ${timestamp} is more than 34 days in the past`);
    const properties = e.properties ?? {};
    if (typeof properties !== 'object' || properties === null)
      throw new Refusal(400, 'properties must be an object');
    const value = Number((properties as Record<string, unknown>).value);
    return {
      transactionId: e.transaction_id as string,
      sentAs: e.customer_id as string,
      customer: null,
      eventType: e.event_type as string,
      timestamp: at,
      value: Number.isFinite(value) ? value : 0,
    };
  };

  const ingest = (body: unknown, res: ServerResponse) => {
    counters.ingestCalls++;
    const scripted = faults.script?.shift();
    const draw = random.next();
    const is = (kind: NonNullable<FakeFaults['script']>[number], p: number | undefined, below: number) =>
      scripted === undefined ? draw < below + (p ?? 0) : scripted === kind;
    let edge = 0;
    if (is('reset', faults.reset, edge)) {
      counters.resets++;
      res.socket?.destroy();
      return;
    }
    edge += faults.reset ?? 0;
    if (is('error500', faults.error500, edge)) {
      counters.error500++;
      return send(res, 500, { message: 'Internal server error' });
    }
    edge += faults.error500 ?? 0;
    if (is('rateLimit429', faults.rateLimit429, edge)) {
      counters.rateLimited++;
      res.setHeader('retry-after', '1');
      return send(res, 429, { message: 'Too many requests' });
    }
    if (!Array.isArray(body) || body.length < 1 || body.length > 100)
      throw new Refusal(400, 'the body must be a JSON array of 1 to 100 usage events');
    const batch: unknown[] = body;
    const now = Date.now();
    // One bad event refuses the whole call: validate them all before recording any.
    const events = batch.map((raw) => validEvent(raw, now));
    for (const e of events) {
      const first = seen.get(e.transactionId);
      if (first !== undefined && now - first < DEDUPE_MS) {
        counters.duplicates++;
        continue;
      }
      seen.set(e.transactionId, now);
      counters.accepted++;
      accepted.push({ ...e, customer: customerOf(e.sentAs)?.id ?? null, receivedAt: now });
    }
    edge += faults.rateLimit429 ?? 0;
    if (is('acceptedThen500', faults.acceptedThen500, edge)) {
      counters.acceptedThen500++;
      return send(res, 500, { message: 'Internal server error' });
    }
    send(res, 200, {});
  };

  /** The events of `customer` attributed now (an alias added later attributes its earlier events). */
  const eventsOf = (customer: FakeCustomer) =>
    accepted.filter((e) => e.customer === customer.id || customer.aliases.includes(e.sentAs));

  const hourWindows = (from: number, to: number) => {
    const windows: [number, number][] = [];
    for (let t = from; t < to; t += HOUR_MS) windows.push([t, Math.min(t + HOUR_MS, to)]);
    return windows;
  };

  const usageByHour = (body: Record<string, unknown>) => {
    const from = Date.parse(String(body.starting_on));
    const to = Date.parse(String(body.ending_before));
    if (!Number.isFinite(from) || !Number.isFinite(to) || to <= from)
      throw new Refusal(400, 'starting_on and ending_before must be timestamps, in order');
    if (String(body.window_size).toUpperCase() !== 'HOUR') throw new Refusal(400, 'this fake answers HOUR');
    const ids = Array.isArray(body.customer_ids)
      ? (body.customer_ids as string[])
      : customers.map((c) => c.id);
    const wanted = Array.isArray(body.billable_metrics)
      ? (body.billable_metrics as { id: string }[]).map((m) => m.id)
      : metrics.map((m) => m.id);
    const data: unknown[] = [];
    for (const id of ids) {
      const customer = customers.find((c) => c.id === id);
      if (!customer) continue;
      const own = eventsOf(customer);
      for (const metric of metrics.filter((m) => wanted.includes(m.id))) {
        const ofMetric = own.filter((e) => e.eventType === metric.name);
        for (const [start, end] of hourWindows(from, to)) {
          const inWindow = ofMetric.filter((e) => e.timestamp >= start && e.timestamp < end);
          let value: number | null = null;
          if (inWindow.length > 0)
            value =
              metric.aggregation_type === 'SUM'
                ? inWindow.reduce((s, e) => s + e.value, 0)
                : inWindow.reduce((a, b) => (b.timestamp >= a.timestamp ? b : a)).value;
          data.push({
            customer_id: customer.id,
            billable_metric_id: metric.id,
            billable_metric_name: metric.name,
            start_timestamp: new Date(start).toISOString(),
            end_timestamp: new Date(end).toISOString(),
            value,
          });
        }
      }
    }
    return { data, next_page: null };
  };

  /** The billable status in force at `at`: the latest value whose effective_at is at or before it. */
  const billableAt = (customer: FakeCustomer, at: number) => {
    let status: 'billable' | 'unbillable' = 'billable';
    let since = Number.NEGATIVE_INFINITY;
    for (const s of customer.billable)
      if (s.effectiveAt <= at && s.effectiveAt >= since) {
        status = s.status;
        since = s.effectiveAt;
      }
    return status;
  };

  const breakdowns = (customer: FakeCustomer, query: URLSearchParams) => {
    const from = Date.parse(query.get('starting_on') ?? '');
    const to = Date.parse(query.get('ending_before') ?? '');
    if (!Number.isFinite(from) || !Number.isFinite(to) || to <= from)
      throw new Refusal(400, 'starting_on and ending_before must be timestamps, in order');
    const own = eventsOf(customer).filter((e) => e.eventType === 'temperature_readings');
    const now = Date.now();
    const data = hourWindows(from, to).map(([start, end]) => {
      const units = own
        .filter((e) => e.timestamp >= start && e.timestamp < end)
        .reduce((s, e) => s + e.value, 0);
      return {
        id: `inv-${customer.id}-${start}`,
        customer_id: customer.id,
        start_timestamp: new Date(start).toISOString(),
        end_timestamp: new Date(end).toISOString(),
        breakdown_start_timestamp: new Date(start).toISOString(),
        breakdown_end_timestamp: new Date(end).toISOString(),
        status: end + DAY_MS <= now ? 'FINALIZED' : 'DRAFT',
        billable_status: billableAt(customer, start),
        total: units * options.rate,
        credit_type: { id: 'usd', name: 'USD (cents)' },
        line_items: [],
        type: 'USAGE',
      };
    });
    return { data, next_page: null };
  };

  const route = (req: IncomingMessage, body: unknown, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://fake');
    const path = url.pathname;
    if (req.headers.authorization !== `Bearer ${token}`) throw new Refusal(401, 'Unauthorized');
    if (req.method === 'POST' && path === '/v1/ingest') return ingest(body, res);
    if (req.method === 'GET' && path === '/v1/billable-metrics')
      return send(res, 200, { data: metrics, next_page: null });
    if (req.method === 'POST' && path === '/v1/usage')
      return send(res, 200, usageByHour((body ?? {}) as Record<string, unknown>));
    if (req.method === 'GET' && path === '/v1/customers') {
      const alias = url.searchParams.get('ingest_alias');
      const found = customers.filter((c) => alias === null || c.aliases.includes(alias));
      return send(res, 200, { data: found.map(customerView), next_page: null });
    }
    if (req.method === 'POST' && path === '/v1/customers') {
      const b = (body ?? {}) as { name?: string; ingest_aliases?: string[]; external_id?: string };
      const aliases = [...(b.ingest_aliases ?? []), ...(b.external_id ? [b.external_id] : [])];
      if (aliases.some((a) => customerOf(a)))
        throw new Refusal(409, 'an ingest alias of this customer is already in use');
      const customer: FakeCustomer = {
        id: `fake-cus-${customers.length + 1}`,
        name: b.name ?? '',
        aliases: [...new Set(aliases)],
        billable: [],
      };
      customers.push(customer);
      // Events sent earlier under one of its aliases are attributed to it now.
      for (const e of accepted)
        if (e.customer === null && customer.aliases.includes(e.sentAs)) e.customer = customer.id;
      return send(res, 200, { data: customerView(customer) });
    }
    const billable = /^\/v1\/customers\/([^/]+)\/setBillableStatus$/.exec(path);
    if (req.method === 'POST' && billable) {
      const customer = customers.find((c) => c.id === billable[1]);
      if (!customer) throw new Refusal(404, 'customer not found');
      const b = (body ?? {}) as { billable_status?: string; effective_at?: string };
      if (b.billable_status !== 'billable' && b.billable_status !== 'unbillable')
        throw new Refusal(400, 'billable_status must be billable or unbillable');
      const effectiveAt = b.effective_at === undefined ? Date.now() : Date.parse(b.effective_at);
      if (!Number.isFinite(effectiveAt)) throw new Refusal(400, 'effective_at must be a timestamp');
      customer.billable.push({ status: b.billable_status, effectiveAt });
      return send(res, 200, {});
    }
    const invoices = /^\/v1\/customers\/([^/]+)\/invoices\/breakdowns$/.exec(path);
    if (req.method === 'GET' && invoices) {
      const customer = customers.find((c) => c.id === invoices[1]);
      if (!customer) throw new Refusal(404, 'customer not found');
      return send(res, 200, breakdowns(customer, url.searchParams));
    }
    throw new Refusal(404, `no route ${req.method} ${path} in this fake`);
  };

  const customerView = (c: FakeCustomer) => ({
    id: c.id,
    name: c.name,
    ingest_aliases: c.aliases,
    external_id: c.aliases[0] ?? null,
    custom_fields: {},
    current_billable_status: { value: billableAt(c, Date.now()) },
  });

  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      try {
        const text = Buffer.concat(chunks).toString('utf8');
        let body: unknown;
        try {
          body = text ? JSON.parse(text) : undefined;
        } catch {
          throw new Refusal(400, 'the body is not JSON');
        }
        route(req, body, res);
      } catch (err) {
        if (err instanceof Refusal) {
          if (req.url?.startsWith('/v1/ingest')) counters.refused++;
          send(res, err.status, { message: err.message });
        } else send(res, 500, { message: String(err) });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    token,
    events: () => accepted.map((e) => ({ ...e })),
    unmatched: () => accepted.filter((e) => e.customer === null).map((e) => ({ ...e })),
    customerByAlias: (alias) => {
      const c = customerOf(alias);
      return c ? { id: c.id, billable: c.billable.map((b) => ({ ...b })) } : undefined;
    },
    setFaults: (next) => {
      faults = { ...next, ...(next.script ? { script: [...next.script] } : {}) };
    },
    counters: () => ({ ...counters }),
    stop: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function send(res: ServerResponse, status: number, body: unknown): void {
  if (res.headersSent || res.destroyed) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
