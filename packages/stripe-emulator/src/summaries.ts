// GET /v1/billing/meters/:id/event_summaries as Stripe shapes it: a list of
// billing.meter_event_summary objects aggregating one customer's events with the meter's formula
// over [start_time, end_time), either as one summary or one per hour/day window. Unlike Stripe the
// emulator aggregates synchronously, so a summary reflects an event as soon as it is accepted.
import { invalidInteger, missingParam, StripeApiError } from './errors.js';
import type { FormObject } from './form.js';
import type { MeterDefinition, RecordedEvent } from './state.js';

export interface MeterEventSummary {
  id: string;
  object: 'billing.meter_event_summary';
  aggregated_value: number;
  start_time: number;
  end_time: number;
  livemode: boolean;
  meter: string;
}

const invalid = (message: string, param: string) =>
  new StripeApiError(400, 'invalid_request_error', message, 'parameter_invalid', param);

function intParam(query: FormObject, name: string): number {
  const raw = query[name];
  if (raw === undefined || raw === '') throw missingParam(name);
  if (typeof raw !== 'string' || !/^\d+$/.test(raw)) throw invalidInteger(name, String(raw));
  return Number(raw);
}

export function aggregate(events: readonly RecordedEvent[], formula: MeterDefinition['formula']): number {
  if (formula === 'count') return events.length;
  if (formula === 'sum') return events.reduce((acc, e) => acc + e.value, 0);
  let latest: RecordedEvent | undefined;
  for (const e of events) if (!latest || e.timestampMs >= latest.timestampMs) latest = e;
  return latest?.value ?? 0;
}

export function summarize(
  all: readonly RecordedEvent[],
  meter: MeterDefinition,
  query: FormObject,
  livemode: boolean,
): { object: 'list'; data: MeterEventSummary[]; has_more: boolean } {
  const customer = query.customer;
  if (typeof customer !== 'string' || customer === '') throw missingParam('customer');
  const start = intParam(query, 'start_time');
  const end = intParam(query, 'end_time');
  if (start >= end) throw invalid('start_time must be before end_time.', 'start_time');
  const window = query.value_grouping_window;
  if (window !== undefined && window !== 'hour' && window !== 'day') {
    throw invalid(`Invalid value_grouping_window: must be one of hour or day`, 'value_grouping_window');
  }
  const step = window === 'hour' ? 3600 : window === 'day' ? 86_400 : 60;
  for (const [name, t] of [
    ['start_time', start],
    ['end_time', end],
  ] as const) {
    if (t % step !== 0) {
      throw invalid(`${name} must be aligned with ${window ?? 'minute'} boundaries.`, name);
    }
  }
  const limitRaw = query.limit;
  const limit = typeof limitRaw === 'string' && limitRaw !== '' ? Number(limitRaw) : 10;
  if (!Number.isInteger(limit) || limit < 1 || limit > 100)
    throw invalid('limit must be between 1 and 100.', 'limit');

  const mine = all.filter(
    (e) =>
      e.customer === customer &&
      e.event_name === meter.event_name &&
      // A meter event adjustment (cancel) takes the event out of every aggregate.
      e.cancelledAt === undefined &&
      e.timestampMs >= start * 1000 &&
      e.timestampMs < end * 1000,
  );
  const windows: [number, number][] = [];
  if (!window) windows.push([start, end]);
  else for (let t = start; t < end; t += step) windows.push([t, t + step]);

  const summaries = windows.map(([from, to]): MeterEventSummary => {
    const inside = mine.filter((e) => e.timestampMs >= from * 1000 && e.timestampMs < to * 1000);
    return {
      id: `mtrusg_${meter.id.replace(/^mtr_/, '')}_${customer}_${from}_${to}`,
      object: 'billing.meter_event_summary',
      aggregated_value: aggregate(inside, meter.formula),
      start_time: from,
      end_time: to,
      livemode,
      meter: meter.id,
    };
  });

  let from = 0;
  if (typeof query.starting_after === 'string') {
    const at = summaries.findIndex((s) => s.id === query.starting_after);
    from = at === -1 ? summaries.length : at + 1;
  }
  const data = summaries.slice(from, from + limit);
  return { object: 'list', data, has_more: from + limit < summaries.length };
}
