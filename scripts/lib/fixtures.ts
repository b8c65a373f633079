// Organizations (with an API key, billable or not) and sensors, written through the same data
// functions the admin API uses: the fixtures the benchmarks and the test kit (test/support) share.
import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import {
  createOrganization as createOrganizationRow,
  linkSubscription,
} from '../../src/admin/organizations.js';
import type { DB, SubscriptionStatus } from '../../src/db/schema.js';

export interface OrganizationFixture {
  organizationId: string;
  /** The whole API key, for `Authorization: Bearer`. */
  apiKey: string;
  apiKeyId: string;
  /** The Stripe customer linked to its subscription. */
  customerId: string;
}

/**
 * An organization with one API key and a subscription linked to a Stripe customer. Billable by
 * default (status `active`); `billable: false` gives status `canceled` (a customer, not billed);
 * `status` overrides both.
 */
export async function createOrganization(
  db: Kysely<DB>,
  options: {
    billable?: boolean;
    customerId?: string;
    status?: SubscriptionStatus;
    name?: string;
    /** false: no subscription row at all (never a Stripe customer), as the benchmarks' free tier. */
    subscription?: boolean;
    /** Stripe Connect: the connected account (acct_…) the customer is on. */
    stripeAccount?: string;
  } = {},
): Promise<OrganizationFixture> {
  const { organization, apiKey } = await db
    .transaction()
    .execute((trx) => createOrganizationRow(trx, { name: options.name ?? 'Test organization' }));
  const customerId = options.customerId ?? `cus_test${randomBytes(6).toString('hex')}`;
  const status = options.status ?? (options.billable === false ? 'canceled' : 'active');
  if (options.subscription !== false) {
    await linkSubscription(
      db,
      organization.id,
      {
        stripeCustomerId: customerId,
        status,
        ...(options.stripeAccount ? { stripeAccount: options.stripeAccount } : {}),
      },
      new Date(),
    );
  }
  return { organizationId: organization.id, apiKey: apiKey.key, apiKeyId: apiKey.id, customerId };
}

/** `count` sensors of the organization (active unless told otherwise); returns their ids in order. */
export async function createSensors(
  db: Kysely<DB>,
  organizationId: string,
  count = 1,
  options: { active?: boolean } = {},
): Promise<string[]> {
  const rows = await db
    .insertInto('sensors')
    .values(
      Array.from({ length: count }, (_, i) => ({
        organization_id: organizationId,
        name: `sensor ${i + 1}`,
        active: options.active ?? true,
      })),
    )
    .returning('id')
    .execute();
  return rows.map((r) => r.id);
}
