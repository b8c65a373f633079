// The fault settings' control routes an emulator mounts under /_emulator: GET /faults reads the
// settings and the seed, POST /faults replaces them (a seed restarts the fault PRNG, so a run can be
// replayed). Never faulted, no credentials.
import type { Hono } from 'hono';
import { z } from 'zod';
import type { Log } from './log.js';

export function registerFaultRoutes<F, I>(
  control: Hono,
  faults: { readonly current: F; readonly seed: number; set(input: I, seed?: number): F },
  schema: z.ZodType<I, unknown>,
  log: Log,
): void {
  control.get('/faults', (c) => c.json({ faults: faults.current, seed: faults.seed }));
  control.post('/faults', async (c) => {
    const body = z
      .looseObject({ seed: z.number().int().optional() })
      .safeParse(await c.req.json().catch(() => undefined));
    if (!body.success) return c.json({ error: { message: 'body must be a JSON object' } }, 400);
    const { seed, ...rest } = body.data;
    const parsed = schema.safeParse(rest);
    if (!parsed.success) return c.json({ error: { message: z.prettifyError(parsed.error) } }, 400);
    const current = faults.set(parsed.data, seed);
    log('info', 'faults changed', { faults: current });
    return c.json({ faults: current, seed: faults.seed });
  });
}
