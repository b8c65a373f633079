// Stripe Connect: which account a Stripe customer belongs to. A customer id is one account's own at
// Stripe (the platform's, or a connected account's), so the mapping is a fact about Stripe, recorded
// when an organization is linked to the customer (admin link, or a Connect checkout) and never changed.
// Every call about the customer (meter events, adjustments, summaries) is made on that account.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { DB } from '../db/schema.js';

type Db = Kysely<DB> | Transaction<DB>;

/** A connected account id, as Stripe writes it. */
export const CONNECTED_ACCOUNT = /^acct_[A-Za-z0-9]+$/;

/** The customer belongs to another account than the one named (or was billed on the platform). */
export class CustomerAccountError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CustomerAccountError';
  }
}

/** The connected account of a customer; null for the platform's own (or an unknown) customer. */
export async function customerAccount(db: Db, customerId: string): Promise<string | null> {
  const row = await db
    .selectFrom('stripe_customer_accounts')
    .select('stripe_account')
    .where('stripe_customer_id', '=', customerId)
    .executeTakeFirst();
  return row?.stripe_account ?? null;
}

/**
 * The connected accounts of customers, kept: a customer's account never changes once it has usage, so
 * what a customer is found to be (a connected account's or the platform's) is asked once (delivery
 * asks it for every batch's customers). Absent from the answer: the platform's.
 */
export function customerAccountCache(
  db: Db,
  lookUp: (customerIds: readonly string[]) => Promise<Map<string, string>> = (ids) =>
    customerAccounts(db, ids),
): (customerIds: readonly string[]) => Promise<Map<string, string>> {
  const accountOfCustomer = new Map<string, string | null>();
  return async (customerIds) => {
    const missing = [...new Set(customerIds.filter((id) => !accountOfCustomer.has(id)))];
    if (missing.length > 0) {
      const found = await lookUp(missing);
      if (accountOfCustomer.size > 100_000) accountOfCustomer.clear();
      for (const id of missing) accountOfCustomer.set(id, found.get(id) ?? null);
    }
    const out = new Map<string, string>();
    for (const id of customerIds) {
      const account = accountOfCustomer.get(id);
      if (account) out.set(id, account);
    }
    return out;
  };
}

/** The connected accounts of these customers (absent from the map: the platform's). One statement. */
export async function customerAccounts(db: Db, customerIds: readonly string[]): Promise<Map<string, string>> {
  if (customerIds.length === 0) return new Map();
  const rows = await db
    .selectFrom('stripe_customer_accounts')
    .select(['stripe_customer_id', 'stripe_account'])
    .where('stripe_customer_id', 'in', [...new Set(customerIds)])
    .execute();
  return new Map(rows.map((r) => [r.stripe_customer_id, r.stripe_account]));
}

/**
 * The connected accounts of these customers (customerAccounts), read on a Citus worker node from `nodeOf`
 * when there is one (stripe_customer_accounts is a reference table: every node holds all of it, and the
 * coordinator neither plans nor runs the read), else on `db`.
 *
 * A link writes the reference table on every node in one two-phase commit: prepared on the workers,
 * committed on the coordinator, then on the workers. A customer's usage is queued only after its link
 * committed, so when this read runs the link is either committed on the node or still prepared there
 * (its commit there not sent yet, or failed and left to Citus's recovery). The node's prepared
 * transactions are looked at first and the rows read after, each statement with its own snapshot: with
 * none prepared, every earlier link is in the second statement's view; with any prepared, or the node
 * failing, the rows are read on `db` (the coordinator's answer), as without a node.
 */
export async function customerAccountsNear(
  db: Db,
  customerIds: readonly string[],
  nodeOf?: () => Promise<Kysely<DB> | undefined>,
): Promise<Map<string, string>> {
  if (customerIds.length === 0) return new Map();
  const node = await nodeOf?.().catch(() => undefined);
  if (node) {
    const found = await (async () => {
      const { rows } = await sql<{ prepared: number }>`
        SELECT count(*)::int AS prepared FROM pg_prepared_xacts WHERE database = current_database()`.execute(
        node,
      );
      return rows[0]?.prepared === 0 ? await customerAccounts(node, customerIds) : undefined;
    })().catch(() => undefined);
    if (found) return found;
  }
  return customerAccounts(db, customerIds);
}

/**
 * Records that `customerId` is `account`'s (null: the platform's), inside the link's transaction.
 * Refused (CustomerAccountError) when the customer is already known on another account, or when a
 * connected account is named for a customer whose usage was already sent to the platform: its
 * meter events are there, and moving them is not a link's business.
 */
export async function recordCustomerAccount(
  trx: Db,
  customerId: string,
  account: string | null,
): Promise<void> {
  const known = await customerAccount(trx, customerId);
  if (known === account) return;
  if (known !== null) {
    throw new CustomerAccountError(
      `Stripe customer ${customerId} belongs to connected account ${known}${account ? `, not ${account}` : ', not the platform'}`,
    );
  }
  if (account === null) return;
  const billed = await trx
    .selectFrom('meter_outbox')
    .select('id')
    .where('stripe_customer_id', '=', customerId)
    .where('destination', '=', 'stripe')
    .limit(1)
    .executeTakeFirst();
  if (billed) {
    throw new CustomerAccountError(
      `Stripe customer ${customerId} already has usage billed on the platform account; a customer of connected account ${account} has another id`,
    );
  }
  await trx
    .insertInto('stripe_customer_accounts')
    .values({ stripe_customer_id: customerId, stripe_account: account })
    .onConflict((oc) => oc.column('stripe_customer_id').doNothing())
    .execute();
  // A concurrent link of the same customer to another account: the row that won decides.
  const now = await customerAccount(trx, customerId);
  if (now !== account) {
    throw new CustomerAccountError(`Stripe customer ${customerId} belongs to connected account ${now}`);
  }
}
