// The control and inspection surface under /_emulator (never faulted, no token): events received,
// duplicates, unmatched events, hourly totals, counters, customers and metrics, one summary of the
// state, reset, the fault settings, and the clock offset (for an emulator in another process).
import { registerFaultRoutes } from '@meterbox/emulator-kit';
import type { Hono } from 'hono';
import { z } from 'zod';
import { billableMetricView } from '../billable-metrics.js';
import { customerDetailView } from '../customers.js';
import { faultsSchema } from '../faults.js';
import { hourTotals, inspectDuplicates, inspectEvents, unmatchedEvents } from '../inspection.js';
import type { Runtime } from '../runtime.js';

const filterSchema = z.object({ customer: z.string().optional(), event_type: z.string().optional() });

export function registerControlRoutes(control: Hono, rt: Runtime): void {
  const { state } = rt;
  const filtered = (query: Record<string, string>) => {
    const parsed = filterSchema.safeParse(query);
    return parsed.success ? parsed.data : {};
  };

  control.get('/health', (c) => c.json({ status: 'ok' }));
  control.get('/events', (c) => c.json({ data: inspectEvents(state, filtered(c.req.query())) }));
  control.get('/duplicates', (c) => c.json({ data: inspectDuplicates(state, filtered(c.req.query())) }));
  control.get('/unmatched', (c) => c.json({ data: unmatchedEvents(state) }));
  control.get('/totals', (c) => c.json({ data: hourTotals(state, filtered(c.req.query())) }));
  control.get('/counters', (c) => c.json(state.counters));
  control.get('/customers', (c) => c.json({ data: [...state.customers.values()].map(customerDetailView) }));
  control.get('/billable-metrics', (c) =>
    c.json({ data: [...state.metrics.values()].map(billableMetricView) }),
  );

  control.get('/state', (c) =>
    c.json({
      now: new Date(rt.clock()).toISOString(),
      clockOffsetMs: rt.clockOffset(),
      counters: state.counters,
      events: state.events.length,
      duplicates: state.duplicates.length,
      unmatched: unmatchedEvents(state).length,
      customers: state.customers.size,
      billableMetrics: state.metrics.size,
      faults: rt.faults.current,
      seed: rt.faults.seed,
      limits: {
        eventsPerSecond: rt.eventLimiter.limit ?? null,
        ingestRequestsPerSecond: rt.ingestLimiter.limit ?? null,
        searchRequestsPerSecond: rt.searchLimiter.limit ?? null,
      },
    }),
  );

  control.post('/reset', async (c) => {
    const body = z
      .object({ customers: z.boolean().optional(), billableMetrics: z.boolean().optional() })
      .safeParse(await c.req.json().catch(() => ({})));
    if (!body.success) return c.json({ error: { message: z.prettifyError(body.error) } }, 400);
    rt.reset(body.data);
    return c.json({ status: 'reset' });
  });

  registerFaultRoutes(control, rt.faults, faultsSchema, rt.log);

  // Moves the emulator's clock by an offset, so a test driving a separate process can cross the
  // 34-day dedupe window or the timestamp limits without waiting.
  control.get('/clock', (c) =>
    c.json({ now: new Date(rt.clock()).toISOString(), offsetMs: rt.clockOffset() }),
  );
  control.post('/clock', async (c) => {
    const body = z
      .union([z.object({ offsetMs: z.number().int() }), z.object({ advanceMs: z.number().int() })])
      .safeParse(await c.req.json().catch(() => undefined));
    if (!body.success) return c.json({ error: { message: 'give offsetMs or advanceMs (integers)' } }, 400);
    rt.setClockOffset('offsetMs' in body.data ? body.data.offsetMs : rt.clockOffset() + body.data.advanceMs);
    return c.json({ now: new Date(rt.clock()).toISOString(), offsetMs: rt.clockOffset() });
  });
}
