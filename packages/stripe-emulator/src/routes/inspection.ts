// Inspection and reset under /_emulator (never faulted, no API key): what the emulator accepted
// (events, totals, counters, concurrency peaks, asynchronous rejections, customers), creating a
// customer, forgetting everything, and one summary of its state.
import type { Hono } from 'hono';
import { z } from 'zod';
import type { Runtime } from '../runtime.js';

export function registerInspectionRoutes(control: Hono, rt: Runtime): void {
  control.get('/health', (c) => c.json({ status: 'ok' }));
  const eventFilterSchema = z.object({
    customer: z.string().optional(),
    event_name: z.string().optional(),
    via: z.enum(['v1', 'v2']).optional(),
    account: z.string().optional(),
  });
  control.get('/events', (c) => {
    const filter = eventFilterSchema.safeParse(c.req.query());
    if (!filter.success) return c.json({ error: { message: z.prettifyError(filter.error) } }, 400);
    return c.json({ data: rt.filterEvents(filter.data) });
  });
  control.get('/totals', (c) => c.json({ data: rt.filterTotals(c.req.query()) }));
  control.get('/counters', (c) => c.json(rt.state.counters));
  control.get('/concurrency', (c) => c.json({ data: [...rt.state.peaks.values()] }));
  control.get('/async_errors', (c) => c.json({ data: rt.state.asyncErrors }));
  control.get('/customers', (c) => c.json({ data: [...rt.state.customers.values()] }));
  control.post('/customers', async (c) => {
    const body = z
      .object({
        id: z
          .string()
          .regex(/^cus_\w+$/)
          .optional(),
        account: z
          .string()
          .regex(/^acct_\w+$/)
          .optional(),
        email: z.string().optional(),
        name: z.string().optional(),
        metadata: z.record(z.string(), z.string()).optional(),
      })
      .safeParse(await c.req.json().catch(() => ({})));
    if (!body.success) return c.json({ error: { message: z.prettifyError(body.error) } }, 400);
    return c.json(rt.createCustomer(body.data), 201);
  });
  control.post('/reset', async (c) => {
    const body = (await c.req.json().catch(() => ({}))) as { customers?: unknown };
    rt.reset({ customers: body.customers === true });
    return c.json({ status: 'reset' });
  });
  control.get('/state', (c) =>
    c.json({
      counters: rt.state.counters,
      totals: rt.filterTotals(),
      concurrency: [...rt.state.peaks.values()],
      events: rt.state.events.length,
      customers: rt.state.customers.size,
      faults: rt.faults.current,
      seed: rt.faults.seed,
      limits: {
        ratePerSecond: rt.limiter.limit,
        streamRatePerSecond: rt.streamLimiter.limit,
        streamEventsPerSecond: Number.isFinite(rt.streamEventLimiter.limit)
          ? rt.streamEventLimiter.limit
          : null,
        concurrencyPerCustomerMeter: rt.concurrencyLimit,
      },
    }),
  );
}
