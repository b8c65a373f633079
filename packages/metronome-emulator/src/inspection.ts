// What the emulator received, for tests and the control API: events with the customer they resolve
// to now, the events no customer claims (yet), and per customer, event type and hour totals (count
// and the sum of every numeric property), all attributed at read time like Metronome's usage.
import { numericValue } from './aggregate.js';
import type { EventFilter } from './options.js';
import type { EmulatorState, IngestedEvent } from './state.js';

export interface InspectedEvent extends IngestedEvent {
  /** The Metronome customer the event's customer_id resolves to now; null while unmatched. */
  matched_customer_id: string | null;
}

export interface HourTotal {
  /** The resolved Metronome customer id, or the raw customer_id of unmatched events. */
  customer_id: string;
  matched: boolean;
  event_type: string;
  /** Start of the UTC hour of the events' timestamps (ISO). */
  hour: string;
  count: number;
  /** Sum of each property that held a number in at least one event. */
  sums: Record<string, number>;
}

const HOUR_MS = 3_600_000;

function inspect(state: EmulatorState, event: IngestedEvent): InspectedEvent {
  return {
    ...event,
    properties: { ...event.properties },
    matched_customer_id: state.resolve(event.customer_id)?.id ?? null,
  };
}

const selected = (e: InspectedEvent, filter: EventFilter) =>
  (!filter.customer || e.customer_id === filter.customer || e.matched_customer_id === filter.customer) &&
  (!filter.event_type || e.event_type === filter.event_type);

export function inspectEvents(state: EmulatorState, filter: EventFilter = {}): InspectedEvent[] {
  return state.events.map((e) => inspect(state, e)).filter((e) => selected(e, filter));
}

export function inspectDuplicates(state: EmulatorState, filter: EventFilter = {}): InspectedEvent[] {
  return state.duplicates.map((e) => inspect(state, e)).filter((e) => selected(e, filter));
}

/** Accepted events whose customer_id is no customer's id or alias: kept, counted nowhere until one is. */
export function unmatchedEvents(state: EmulatorState): InspectedEvent[] {
  return inspectEvents(state).filter((e) => e.matched_customer_id === null);
}

export function hourTotals(state: EmulatorState, filter: EventFilter = {}): HourTotal[] {
  const totals = new Map<string, HourTotal>();
  for (const e of inspectEvents(state, filter)) {
    const customer = e.matched_customer_id ?? e.customer_id;
    const hourStart = Math.floor(e.timestampMs / HOUR_MS) * HOUR_MS;
    const key = `${customer}\u0000${e.matched_customer_id !== null}\u0000${e.event_type}\u0000${hourStart}`;
    let total = totals.get(key);
    if (!total) {
      total = {
        customer_id: customer,
        matched: e.matched_customer_id !== null,
        event_type: e.event_type,
        hour: new Date(hourStart).toISOString(),
        count: 0,
        sums: {},
      };
      totals.set(key, total);
    }
    total.count += 1;
    for (const [name, raw] of Object.entries(e.properties)) {
      const n = numericValue(raw);
      if (n !== undefined) total.sums[name] = (total.sums[name] ?? 0) + n;
    }
  }
  return [...totals.values()].sort(
    (a, b) =>
      a.customer_id.localeCompare(b.customer_id) ||
      a.event_type.localeCompare(b.event_type) ||
      a.hour.localeCompare(b.hour),
  );
}
