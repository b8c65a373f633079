// Fault injection's control surface under /_emulator: GET /faults reads the settings and the seed,
// POST /faults replaces them (a seed restarts the fault PRNG, so a run can be replayed).
import type { Hono } from 'hono';
import { z } from 'zod';
import { faultsSchema } from '../faults.js';
import type { Runtime } from '../runtime.js';

export function registerFaultControlRoutes(control: Hono, rt: Runtime): void {
  control.get('/faults', (c) => c.json({ faults: rt.faults.current, seed: rt.faults.seed }));
  control.post('/faults', async (c) => {
    const body = z
      .object({ seed: z.number().int().optional() })
      .passthrough()
      .safeParse(await c.req.json().catch(() => undefined));
    if (!body.success) return c.json({ error: { message: 'body must be a JSON object' } }, 400);
    const { seed, ...rest } = body.data;
    const parsed = faultsSchema.safeParse(rest);
    if (!parsed.success) return c.json({ error: { message: z.prettifyError(parsed.error) } }, 400);
    const current = rt.faults.set(parsed.data, seed);
    rt.log('info', 'faults changed', { faults: current });
    return c.json({ faults: current, seed: rt.faults.seed });
  });
  // Stripe Connect: a connected account revokes the platform's access (every call on it answers 403
  // account_invalid) or grants it again.
  control.get('/revoked-accounts', (c) => c.json({ accounts: [...rt.revokedAccounts].sort() }));
  control.post('/revoked-accounts/:account', (c) => {
    rt.revokedAccounts.add(c.req.param('account'));
    return c.json({ accounts: [...rt.revokedAccounts].sort() });
  });
  control.delete('/revoked-accounts/:account', (c) => {
    rt.revokedAccounts.delete(c.req.param('account'));
    return c.json({ accounts: [...rt.revokedAccounts].sort() });
  });
}
