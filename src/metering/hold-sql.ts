// The named hold of keys whose meter is missing (holdKeys) and its end once the meter exists
// (releaseHeldKeys): one statement each, per shard group.
import { type Kysely, sql } from 'kysely';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import {
  keyMatch,
  orgArray,
  organizationsWhere,
  type Placement,
  perShardGroup,
  routerOf,
  rowKey,
} from './delivery-sql-shapes.js';
import { compareKeys, destinationOf, type KeyRef, keyName, keyRef } from './rules/keys.js';

/** Puts keys on the named hold of a missing meter: no job until releaseHeldKeys. One statement per shard group. */
export async function holdKeys(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  placement: Placement = {},
): Promise<void> {
  if (keys.length === 0) return;
  const unique = [...new Map(keys.map((k) => [keyName(k), keyRef(k)])).values()].sort(compareKeys);
  await perShardGroup(
    routerOf(db, placement),
    unique,
    (k) => k.organizationId,
    async (group) => {
      // A multi-row VALUES upsert: Citus routes it to the keys' shard group (an INSERT ... SELECT it
      // would run on the coordinator).
      await db
        .insertInto('meter_delivery_keys')
        .values(
          group.map((k) => ({
            organization_id: k.organizationId,
            stripe_customer_id: k.customerId,
            event_name: k.eventName,
            destination: destinationOf(k),
            hold: 'meter_missing' as const,
          })),
        )
        .onConflict((oc) =>
          oc.columns(['organization_id', 'stripe_customer_id', 'event_name', 'destination']).doUpdateSet({
            hold: 'meter_missing',
          }),
        )
        .execute();
      return [];
    },
  );
}

/**
 * Whose held keys a release ends (Stripe Connect: meters are an account's own, so a meter found on one
 * account frees only that account's customers' keys): `null`, the platform's customers (those without
 * a stripe_customer_accounts row); an account id, that connected account's; absent, every customer's.
 */
export type HoldScope = { account: string | null } | undefined;

/**
 * Ends the hold of every key of a meter that is back: returns them, for the caller to queue. One
 * statement (per shard group on Citus, after a read of the organizations with such holds).
 */
export async function releaseHeldKeys(
  db: Kysely<DB>,
  eventName: MeterEventName,
  placement: Placement = {},
  destination: Destination = 'stripe',
  scope: HoldScope = undefined,
): Promise<KeyRef[]> {
  // On Citus every held key of the meter is released, as before scopes (not run there with the
  // sub-select): a key of another account is claimed, found held by its own catalog and held again.
  const whose =
    scope === undefined || placement.distributed
      ? sql``
      : scope.account === null
        ? sql` AND NOT EXISTS (SELECT 1 FROM stripe_customer_accounts a
                                WHERE a.stripe_customer_id = meter_delivery_keys.stripe_customer_id)`
        : sql` AND stripe_customer_id IN (SELECT stripe_customer_id FROM stripe_customer_accounts
                                           WHERE stripe_account = ${scope.account})`;
  const held = sql`hold = 'meter_missing' AND event_name = ${eventName} AND destination = ${destination}${whose}`;
  const statement = (orgs: readonly string[] | null) => sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
    destination: Destination;
  }>`
      WITH l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
                  WHERE ${orgs ? sql`organization_id = ANY(${orgArray(orgs)}) AND ` : sql``} ${held}
                  ORDER BY 1, 2, 3, 4 FOR UPDATE SKIP LOCKED),
      u AS (UPDATE meter_delivery_keys d SET hold = NULL
              FROM l
             WHERE ${keyMatch('d', 'l', orgs)}
            RETURNING d.organization_id, d.stripe_customer_id AS customer, d.event_name, d.destination)
      SELECT * FROM u`;
  const rows = !placement.distributed
    ? (await statement(null).execute(db)).rows
    : await perShardGroup(
        routerOf(db, placement),
        await organizationsWhere(db, held),
        (o) => o,
        async (_, orgs) => (await statement(orgs).execute(db)).rows,
      );
  return rows.map(rowKey);
}
