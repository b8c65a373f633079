-- Stripe Connect (issue 44): an organization may bill to a customer on a connected account. Every call
-- about that customer (meter events, adjustments, summaries) carries the account (the Stripe-Account
-- header; Stripe-Context for a v2 stream session), and each connected account has its own call budget.

-- The account a Stripe customer belongs to. A customer id is one account's own at Stripe, so the row is
-- a fact about Stripe, written when an organization is linked to the customer and never changed:
-- outbox rows of the customer, whoever they were written for, are sent to this account. A customer
-- without a row is the platform's own.
CREATE TABLE stripe_customer_accounts (
  stripe_customer_id text PRIMARY KEY,
  stripe_account     text NOT NULL CHECK (stripe_account ~ '^acct_[A-Za-z0-9]+$'),
  created_at         timestamptz NOT NULL DEFAULT now()
);

-- One budget row per connected account (Stripe counts its meter events toward the account's own basic
-- limit, not the platform's): rows 1 and 2 stay Stripe's platform and Metronome's; a connected
-- account's row is created on first use, its id from a sequence.
ALTER TABLE meter_call_budget ALTER COLUMN id TYPE integer;
ALTER TABLE meter_call_budget ADD COLUMN stripe_account text UNIQUE
  CHECK (stripe_account ~ '^acct_[A-Za-z0-9]+$');
ALTER TABLE meter_call_budget DROP CONSTRAINT meter_call_budget_id_check;
ALTER TABLE meter_call_budget ADD CONSTRAINT meter_call_budget_id_check
  CHECK ((id IN (1, 2) AND stripe_account IS NULL) OR (id >= 1000 AND stripe_account IS NOT NULL));
CREATE SEQUENCE meter_call_budget_account_ids START 1000 AS integer;

-- A Connect webhook's event names the connected account it happened on (its `account` field); null
-- for the platform's own events. Event ids are unique across accounts, so the key stays event_id.
ALTER TABLE stripe_events ADD COLUMN stripe_account text;
