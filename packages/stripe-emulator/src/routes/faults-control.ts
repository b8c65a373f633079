// Fault injection's control surface under /_emulator (the kit's routes, @meterbox/emulator-kit):
// GET /faults reads the settings and the seed, POST /faults replaces them (a seed restarts the fault
// PRNG, so a run can be replayed).
import { registerFaultRoutes } from '@meterbox/emulator-kit';
import type { Hono } from 'hono';
import { faultsSchema } from '../faults.js';
import type { Runtime } from '../runtime.js';

export function registerFaultControlRoutes(control: Hono, rt: Runtime): void {
  registerFaultRoutes(control, rt.faults, faultsSchema, rt.log);
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
