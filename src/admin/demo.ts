// The demo organization of `npm start`: an active subscription linked to a Stripe (emulator)
// customer and three sensors, so a reading sent with the printed curl command is billed at once.
import type { Context } from '../context-type.js';
import { authenticateApiKey } from '../credentials/api-keys.js';
import type { Destination } from '../db/schema.js';
import { createSensor } from '../ingest/sensors.js';
import { shadowFromTheStart } from './destinations.js';
import { createApiKey, createOrganization, linkSubscription } from './organizations.js';

export const DEMO_ORGANIZATION_NAME = 'Demo Cold Chain';

export interface DemoOrganization {
  organizationId: string;
  apiKey: string;
  customerId: string;
  sensorIds: string[];
  created: boolean;
}

/**
 * Returns the demo organization, creating it on first run. `knownKey` is the key a previous run
 * printed (dev mode keeps it in its data directory): still valid for this organization, it is
 * returned again, so the printed key stays the same across restarts; otherwise a new key is minted.
 * `createCustomer` makes the Stripe customer (the emulator's, in dev mode). `shadow`: a destination
 * a new demo organization also sends its usage to from its first reading (a parallel run).
 */
export async function ensureDemoOrganization(
  ctx: Context,
  createCustomer: (organizationId: string) => Promise<string>,
  knownKey?: string,
  shadow?: Destination,
): Promise<DemoOrganization> {
  const existing = await ctx.db
    .selectFrom('organizations')
    .innerJoin('subscriptions', 'subscriptions.organization_id', 'organizations.id')
    .select(['organizations.id', 'subscriptions.stripe_customer_id'])
    .where('organizations.name', '=', DEMO_ORGANIZATION_NAME)
    .orderBy('organizations.created_at')
    .executeTakeFirst();

  if (existing?.stripe_customer_id) {
    const known = knownKey ? await authenticateApiKey(ctx.db, knownKey, ctx.clock.now()) : null;
    const key =
      known?.organizationId === existing.id
        ? { key: knownKey! }
        : await ctx.db
            .transaction()
            .execute((trx) => createApiKey(trx, existing.id, `dev ${ctx.clock.now().toISOString()}`));
    const sensors = await ctx.db
      .selectFrom('sensors')
      .select('id')
      .where('organization_id', '=', existing.id)
      .where('active', '=', true)
      .orderBy('created_at')
      .execute();
    return {
      organizationId: existing.id,
      apiKey: key!.key,
      customerId: existing.stripe_customer_id,
      sensorIds: sensors.map((s) => s.id),
      created: false,
    };
  }

  const { organization, apiKey } = await ctx.db.transaction().execute((trx) =>
    createOrganization(trx, {
      name: DEMO_ORGANIZATION_NAME,
      keyName: 'dev',
      destination: ctx.config.DEFAULT_DESTINATION,
    }),
  );
  if (shadow && shadow !== ctx.config.DEFAULT_DESTINATION)
    await ctx.db.transaction().execute((trx) => shadowFromTheStart(trx, organization.id, shadow));
  const customerId = await createCustomer(organization.id);
  await linkSubscription(
    ctx.db,
    organization.id,
    { stripeCustomerId: customerId, status: 'active' },
    ctx.clock.now(),
  );
  const sensorIds = await ctx.db.transaction().execute(async (trx) => {
    const ids: string[] = [];
    for (const name of ['cold room 1', 'cold room 2', 'delivery van']) {
      ids.push((await createSensor(trx, ctx.boss, ctx.clock, organization.id, { name, active: true })).id);
    }
    return ids;
  });
  return { organizationId: organization.id, apiKey: apiKey.key, customerId, sensorIds, created: true };
}
