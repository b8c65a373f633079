// Organizations, their API keys and the link of their subscription to a Stripe customer: the data
// functions behind the admin routes and the `meterbox org|key` commands.
import { type Kysely, sql, type Transaction } from 'kysely';
import { CustomerAccountError, customerAccount, recordCustomerAccount } from '../billing/connect.js';
import { customerPendingElsewhere } from '../billing/subscriptions.js';
import { generateApiKey } from '../credentials/api-keys.js';
import { isUniqueViolation } from '../db/errors.js';
import type { DB, Destination, SubscriptionStatus } from '../db/schema.js';
import { billedAt } from '../metering/destinations.js';
import { assignInitialDestination, listIntervals } from './destinations.js';

type Db = Kysely<DB> | Transaction<DB>;

export const SUBSCRIPTION_STATUSES = [
  'incomplete',
  'incomplete_expired',
  'trial',
  'active',
  'past_due',
  'canceled',
  'unpaid',
  'paused',
] as const satisfies readonly SubscriptionStatus[];

export interface OrganizationView {
  id: string;
  name: string;
  createdAt: Date;
}

export interface ApiKeyView {
  id: string;
  organizationId: string;
  name: string;
  /** Display prefix only; the key itself is never stored. */
  prefix: string;
  createdAt: Date;
  lastUsedAt: Date | null;
  revokedAt: Date | null;
}

/** A freshly created key: the only time the whole key is available. */
export interface CreatedApiKey extends ApiKeyView {
  key: string;
}

export interface SubscriptionView {
  organizationId: string;
  stripeCustomerId: string | null;
  stripeSubscriptionId: string | null;
  /** The connected account (acct_…) the customer is on (Stripe Connect); null: the platform's own. */
  stripeAccount: string | null;
  status: SubscriptionStatus;
  updatedAt: Date;
}

/** The Stripe customer or subscription id is already linked to another organization. */
export class AlreadyLinkedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AlreadyLinkedError';
  }
}

/** The customer still has usage of another organization to deliver: link it once that is delivered. */
export class CustomerStillBilledError extends AlreadyLinkedError {
  constructor(customerId: string, organizationId: string) {
    super(
      `Stripe customer ${customerId} still has usage of organization ${organizationId} waiting for delivery; link it once that is delivered`,
    );
    this.name = 'CustomerStillBilledError';
  }
}

const keyColumns = [
  'id',
  'organization_id',
  'name',
  'prefix',
  'created_at',
  'last_used_at',
  'revoked_at',
] as const;

function toKeyView(row: {
  id: string;
  organization_id: string;
  name: string;
  prefix: string;
  created_at: Date;
  last_used_at: Date | null;
  revoked_at: Date | null;
}): ApiKeyView {
  return {
    id: row.id,
    organizationId: row.organization_id,
    name: row.name,
    prefix: row.prefix,
    createdAt: row.created_at,
    lastUsedAt: row.last_used_at,
    revokedAt: row.revoked_at,
  };
}

/** Creates a key for an existing organization. Returns null when the organization does not exist. */
export async function createApiKey(
  trx: Transaction<DB>,
  organizationId: string,
  name = 'default',
): Promise<CreatedApiKey | null> {
  const organization = await trx
    .selectFrom('organizations')
    .select('id')
    .where('id', '=', organizationId)
    .executeTakeFirst();
  if (!organization) return null;
  // The display prefix is UNIQUE and carries 48 random bits: a clash is astronomically rare, but a
  // fresh key is cheaper than explaining a 500. DO NOTHING keeps the caller's transaction usable.
  for (let attempt = 0; attempt < 5; attempt++) {
    const generated = generateApiKey();
    const row = await trx
      .insertInto('api_keys')
      .values({ organization_id: organizationId, name, prefix: generated.prefix, key_hash: generated.hash })
      .onConflict((oc) => oc.doNothing())
      .returning(keyColumns)
      .executeTakeFirst();
    if (row) return { ...toKeyView(row), key: generated.key };
  }
  throw new Error('could not generate a unique API key prefix');
}

/** Creates an organization and its first API key, in the caller's transaction. */
export async function createOrganization(
  trx: Transaction<DB>,
  input: { name: string; keyName?: string; destination?: Destination },
): Promise<{ organization: OrganizationView; apiKey: CreatedApiKey }> {
  const row = await trx
    .insertInto('organizations')
    .values({ name: input.name })
    .returning(['id', 'name', 'created_at'])
    .executeTakeFirstOrThrow();
  // DEFAULT_DESTINATION: where a new organization's usage is billed (Stripe needs no row).
  await assignInitialDestination(trx, row.id, input.destination ?? 'stripe');
  const apiKey = await createApiKey(trx, row.id, input.keyName);
  if (!apiKey) throw new Error('organization vanished while creating its first key');
  return { organization: { id: row.id, name: row.name, createdAt: row.created_at }, apiKey };
}

export async function getOrganization(db: Db, organizationId: string): Promise<OrganizationView | null> {
  const row = await db
    .selectFrom('organizations')
    .select(['id', 'name', 'created_at'])
    .where('id', '=', organizationId)
    .executeTakeFirst();
  return row ? { id: row.id, name: row.name, createdAt: row.created_at } : null;
}

/** All keys of an organization, newest first, revoked ones included (with revokedAt). */
export async function listApiKeys(db: Db, organizationId: string): Promise<ApiKeyView[]> {
  const rows = await db
    .selectFrom('api_keys')
    .select(keyColumns)
    .where('organization_id', '=', organizationId)
    .orderBy('created_at', 'desc')
    .orderBy('id')
    .execute();
  return rows.map(toKeyView);
}

/**
 * Revokes a key at `now` (idempotent: an already revoked key keeps its first revocation time).
 * When organizationId is given the key must belong to it. Returns null when there is no such key.
 */
export async function revokeApiKey(
  db: Db,
  keyId: string,
  now: Date,
  organizationId?: string,
): Promise<ApiKeyView | null> {
  let query = db
    .updateTable('api_keys')
    .set((eb) => ({ revoked_at: eb.fn.coalesce('revoked_at', eb.val(now)) }))
    .where('id', '=', keyId);
  if (organizationId !== undefined) query = query.where('organization_id', '=', organizationId);
  const row = await query.returning(keyColumns).executeTakeFirst();
  return row ? toKeyView(row) : null;
}

/**
 * Links the organization's subscription to a Stripe customer (creating the row if needed) and sets
 * its status; the webhook handlers later keep it current. Returns null for an unknown organization;
 * throws AlreadyLinkedError when another organization already has that customer or subscription, or
 * still has usage of that customer waiting for delivery (CustomerStillBilledError).
 */
export async function linkSubscription(
  db: Db,
  organizationId: string,
  input: {
    stripeCustomerId: string;
    status: SubscriptionStatus;
    stripeSubscriptionId?: string | null;
    /** The connected account the customer is on (Stripe Connect); absent or null: the platform's. */
    stripeAccount?: string | null;
  },
  now: Date,
): Promise<SubscriptionView | null> {
  const organization = await getOrganization(db, organizationId);
  if (!organization) return null;
  // A customer is billed for one organization at a time (customerPendingElsewhere says why).
  const busy = await customerPendingElsewhere(db, input.stripeCustomerId, organizationId);
  if (busy) throw new CustomerStillBilledError(input.stripeCustomerId, busy);
  const values = {
    stripe_customer_id: input.stripeCustomerId,
    status: input.status,
    updated_at: now,
    ...(input.stripeSubscriptionId !== undefined
      ? { stripe_subscription_id: input.stripeSubscriptionId }
      : {}),
  };
  const link = async (trx: Db) => {
    // The customer's account first: every call about it is made there (billing/connect.ts).
    await recordCustomerAccount(trx, input.stripeCustomerId, input.stripeAccount ?? null);
    return trx
      .insertInto('subscriptions')
      .values({ organization_id: organizationId, ...values })
      .onConflict((oc) => oc.column('organization_id').doUpdateSet(values))
      .returning(['organization_id', 'stripe_customer_id', 'stripe_subscription_id', 'status', 'updated_at'])
      .executeTakeFirstOrThrow();
  };
  try {
    const row = db.isTransaction ? await link(db) : await db.transaction().execute(link);
    return {
      organizationId: row.organization_id,
      stripeCustomerId: row.stripe_customer_id,
      stripeSubscriptionId: row.stripe_subscription_id,
      stripeAccount: input.stripeAccount ?? null,
      status: row.status,
      updatedAt: row.updated_at,
    };
  } catch (err) {
    if (err instanceof CustomerAccountError) throw new AlreadyLinkedError(err.message);
    if (isUniqueViolation(err, 'subscriptions_stripe_customer_id_key')) {
      throw new AlreadyLinkedError(
        `Stripe customer ${input.stripeCustomerId} is already linked to another organization`,
      );
    }
    if (isUniqueViolation(err, 'subscriptions_stripe_subscription_id_key')) {
      throw new AlreadyLinkedError('that Stripe subscription is already linked to another organization');
    }
    throw err;
  }
}

/** The organization's usage is not billed at Metronome: a Metronome link would bill nothing. */
export class NotOnMetronomeError extends Error {
  constructor(organizationId: string) {
    super(
      `organization ${organizationId} is not billed at Metronome: link a Stripe customer (--customer cus_…), or move it first (meterbox destinations set --organization ${organizationId} metronome)`,
    );
    this.name = 'NotOnMetronomeError';
  }
}

/**
 * Makes an organization that bills to Metronome billable without a Stripe customer: its subscription
 * row (created if needed) takes `status`; a Stripe customer already linked stays. Metronome addresses
 * the organization by its ingest alias, whose customer the caller has found or created
 * (destinations.ts prepareDestination). Refuses an organization that is not billed at Metronome now
 * or from a coming hour boundary (NotOnMetronomeError); returns null for an unknown organization.
 */
export async function linkMetronomeSubscription(
  db: Db,
  organizationId: string,
  status: SubscriptionStatus,
  now: Date,
): Promise<SubscriptionView | null> {
  const organization = await getOrganization(db, organizationId);
  if (!organization) return null;
  const open = (await listIntervals(db, organizationId)).filter((i) => i.until === null);
  if (!open.some((i) => i.destination === 'metronome' && i.role === 'billing'))
    throw new NotOnMetronomeError(organizationId);
  const row = await db
    .insertInto('subscriptions')
    .values({ organization_id: organizationId, status, updated_at: now })
    .onConflict((oc) => oc.column('organization_id').doUpdateSet({ status, updated_at: now }))
    .returning(['organization_id', 'stripe_customer_id', 'stripe_subscription_id', 'status', 'updated_at'])
    .executeTakeFirstOrThrow();
  return {
    organizationId: row.organization_id,
    stripeCustomerId: row.stripe_customer_id,
    stripeSubscriptionId: row.stripe_subscription_id,
    stripeAccount: row.stripe_customer_id ? await customerAccount(db, row.stripe_customer_id) : null,
    status: row.status,
    updatedAt: row.updated_at,
  };
}

export async function getSubscription(db: Db, organizationId: string): Promise<SubscriptionView | null> {
  const row = await db
    .selectFrom('subscriptions')
    .select(['organization_id', 'stripe_customer_id', 'stripe_subscription_id', 'status', 'updated_at'])
    .where('organization_id', '=', organizationId)
    .executeTakeFirst();
  return row
    ? {
        organizationId: row.organization_id,
        stripeCustomerId: row.stripe_customer_id,
        stripeSubscriptionId: row.stripe_subscription_id,
        stripeAccount: row.stripe_customer_id ? await customerAccount(db, row.stripe_customer_id) : null,
        status: row.status,
        updatedAt: row.updated_at,
      }
    : null;
}

export interface OrganizationListItem extends OrganizationView {
  /**
   * Billed now: subscription active or trial, and a customer at the destination billing it (a Stripe
   * customer, or at Metronome the customer with the organization's ingest alias).
   */
  billable: boolean;
  subscriptionStatus: SubscriptionStatus | null;
  stripeCustomerId: string | null;
}

export interface OrganizationPage {
  organizations: OrganizationListItem[];
  /** Pass as `cursor` for the next page; null on the last page. */
  nextCursor: string | null;
}

export class UnknownCursorError extends Error {
  constructor() {
    super('cursor must be the nextCursor of a previous page');
    this.name = 'UnknownCursorError';
  }
}

/**
 * Organizations oldest first, `limit` a page (keyset on created_at, id). The cursor is the last
 * organization id of the previous page, so a page never shifts when organizations are added.
 */
export async function listOrganizations(
  db: Db,
  options: { limit: number; cursor?: string | undefined },
): Promise<OrganizationPage> {
  let query = db
    .selectFrom('organizations as o')
    .leftJoin('subscriptions as s', 's.organization_id', 'o.id')
    .select(['o.id', 'o.name', 'o.created_at', 's.status', 's.stripe_customer_id'])
    .select(billedAt(sql`o.id`, sql`now()`).as('billed'))
    .orderBy('o.created_at')
    .orderBy('o.id')
    .limit(options.limit + 1);
  if (options.cursor !== undefined) {
    const after = await db
      .selectFrom('organizations')
      .select(['created_at', 'id'])
      .where('id', '=', options.cursor)
      .executeTakeFirst();
    if (!after) throw new UnknownCursorError();
    // Compared in SQL: created_at keeps microseconds a JavaScript Date would lose.
    query = query.where(
      sql<boolean>`(o.created_at, o.id) > (SELECT c.created_at, c.id FROM organizations c WHERE c.id = ${after.id})`,
    );
  }
  const rows = await query.execute();
  const page = rows.slice(0, options.limit);
  return {
    organizations: page.map((r) => ({
      id: r.id,
      name: r.name,
      createdAt: r.created_at,
      billable: r.billed === true,
      subscriptionStatus: r.status ?? null,
      stripeCustomerId: r.stripe_customer_id ?? null,
    })),
    nextCursor: rows.length > options.limit ? (page.at(-1)?.id ?? null) : null,
  };
}
