-- Delivery state that lives with the data: a delivery key is (organization, customer, meter,
-- destination), so on Citus the key table is distributed by organization_id and co-located with
-- meter_outbox, and one key's claim, calls and settle touch one shard group (src/db/citus.ts places
-- it). On one node nothing changes but the key's width: a customer is billed for one organization at
-- a time (linking a customer that another organization still has pending rows for is deferred,
-- src/billing/subscriptions.ts), so the wider key names the same rows as before.
--
-- The table is built anew rather than altered: on Citus the old table is a reference table, which
-- can be neither filled from the distributed outbox by an UPDATE nor given a distribution column in
-- place. A key row is only state (lease, pacing, backoff, hold) and is created by the first claim of
-- its key; the rows worth keeping are those of keys with pending rows, one per organization that has
-- them (a lease stays with every organization's copy, so a call still in flight stays alone).
CREATE TABLE meter_delivery_keys_by_org (
  organization_id     uuid NOT NULL,
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  destination         text NOT NULL DEFAULT 'stripe' CHECK (destination IN ('stripe', 'metronome')),
  lease_owner         text,
  lease_expires_at    timestamptz,
  leased_at           timestamptz,
  next_call_at        timestamptz NOT NULL DEFAULT '-infinity',
  retry_at            timestamptz,
  hold                text CHECK (hold IN ('meter_missing')),
  PRIMARY KEY (organization_id, stripe_customer_id, event_name, destination)
);

INSERT INTO meter_delivery_keys_by_org
  (organization_id, stripe_customer_id, event_name, destination, lease_owner, lease_expires_at, leased_at,
   next_call_at, retry_at, hold)
SELECT o.organization_id, k.stripe_customer_id, k.event_name, k.destination, k.lease_owner, k.lease_expires_at,
       k.leased_at, k.next_call_at, k.retry_at, k.hold
  FROM meter_delivery_keys k
  JOIN (SELECT DISTINCT organization_id, stripe_customer_id, event_name, destination
          FROM meter_outbox WHERE status = 'pending') o
    ON o.stripe_customer_id = k.stripe_customer_id AND o.event_name = k.event_name
   AND o.destination = k.destination;

DROP TABLE meter_delivery_keys;
ALTER TABLE meter_delivery_keys_by_org RENAME TO meter_delivery_keys;
ALTER TABLE meter_delivery_keys RENAME CONSTRAINT meter_delivery_keys_by_org_pkey TO meter_delivery_keys_pkey;

CREATE INDEX meter_delivery_keys_held ON meter_delivery_keys (event_name) WHERE hold IS NOT NULL;
CREATE INDEX meter_delivery_keys_leased ON meter_delivery_keys (lease_expires_at) WHERE lease_owner IS NOT NULL;
