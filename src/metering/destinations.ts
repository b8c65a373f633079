// Where an organization's usage is billed (issue 34): the destinations in force at an instant, as a
// SQL fragment that ingestion, the hourly active-sensors report and anything else writing outbox rows
// joins in its own statement (no extra round trip, and the same snapshot as the rows it writes).
//
// organization_destinations (0024) holds intervals [valid_from, valid_until) on UTC hour boundaries;
// an organization with no interval at all bills to Stripe alone, as before destinations existed. Each
// destination in force at a row's usage time gets its own outbox row, with its own customer: Stripe's
// customer id, or the Metronome ingest alias meterbox controls.
import { type RawBuilder, sql } from 'kysely';
import { BILLABLE_STATUSES, type Destination } from '../db/schema.js';
import { METRONOME_ALIAS_PREFIX } from './metronome.js';

export type DestinationRole = 'billing' | 'shadow';

/**
 * Organization `org`'s destination intervals (SQL), as a join to add to a FROM clause; with
 * `inForceAt(at)` in the WHERE clause, the rows left are its intervals covering `at`, or one row with no
 * interval (('stripe', 'billing')) when it has none at all. Select `DESTINATION` and `ROLE`. One join
 * of every interval of the organization (a look-up by its key: an organization has a few), filtered
 * after it: an organization that has intervals but none covering `at` keeps no row. The test "has none at
 * all" was a second join, to the table grouped by organization, which PostgreSQL does not restrict to
 * the statement's organizations: every statement using it aggregated the whole table (116 ms a group
 * statement with 20,000 organizations with intervals; test/metering/destinations-plan.test.ts). Joins
 * rather than a lateral subquery with a UNION: Citus plans neither a UNION over a reference table
 * (organization_destinations is one) nor a correlated subquery inside a statement that also writes
 * distributed tables (ingestion's).
 */
export function destinationsJoin(org: RawBuilder<unknown>) {
  return sql`
      LEFT JOIN organization_destinations od ON od.organization_id = ${org}`;
}

/** destinationsJoin's rows in force at `at`: an interval covering the instant, or no interval at all. */
export function inForceAt(at: RawBuilder<unknown>) {
  return sql`(od.organization_id IS NULL
              OR (od.valid_from <= ${at} AND (od.valid_until IS NULL OR od.valid_until > ${at})))`;
}

/** The destination of a row of destinationsJoin. */
export const DESTINATION = sql`coalesce(od.destination, 'stripe')`;
/** Its role. */
export const ROLE = sql`coalesce(od.role, 'billing')`;

/**
 * The customer column of an outbox row at `destination` (SQL): Stripe's customer id, or the
 * organization's Metronome ingest alias (metronome.ts metronomeAlias).
 */
export function destinationCustomer(
  destination: RawBuilder<unknown>,
  stripeCustomer: RawBuilder<unknown>,
  org: RawBuilder<unknown>,
) {
  return sql`CASE ${destination} WHEN 'stripe' THEN ${stripeCustomer}
                 ELSE ${METRONOME_ALIAS_PREFIX}::text || ${org}::text END`;
}

/**
 * Whether a subscription can be billed at `destination` (SQL): Stripe needs its customer id;
 * Metronome addresses the organization by alias and needs only the billable status.
 */
export function billableAt(destination: RawBuilder<unknown>, stripeCustomer: RawBuilder<unknown>) {
  return sql`(${destination} <> 'stripe' OR ${stripeCustomer} IS NOT NULL)`;
}

/**
 * Whether organization `org` is billed at `at` (SQL boolean), by the predicate ingestion and the hourly
 * report use: a subscription `active` or `trial`, and a customer at the destination that bills it then
 * (Stripe: its customer id; Metronome: the customer with the organization's ingest alias, which
 * `meterbox org link --metronome` or `metronome setup` finds or creates).
 */
export function billedAt(org: RawBuilder<unknown>, at: RawBuilder<unknown>) {
  return sql<boolean>`EXISTS (
      SELECT 1 FROM subscriptions s ${destinationsJoin(sql`s.organization_id`)}
       WHERE s.organization_id = ${org} AND s.status = ANY(${[...BILLABLE_STATUSES]}::text[])
         AND ${inForceAt(at)} AND ${ROLE} = 'billing' AND ${billableAt(DESTINATION, sql`s.stripe_customer_id`)})`;
}

/** An interval of organization_destinations. */
export interface DestinationInterval {
  destination: Destination;
  role: DestinationRole;
  validFrom: Date | null;
  validUntil: Date | null;
}
