-- Stripe Connect: a connected account that refuses the platform access (it deauthorized the platform:
-- Stripe answers 403 `account_invalid`, or sends `account.application.deauthorized`) holds that
-- account's deliveries instead of failing them (issue 44). The hold is the account's destination_health
-- row, down, with access_refused_since set: its groups wait uncounted (pending, never dead-lettered)
-- while one probe at a time asks again; an accepted call or `account.application.authorized` ends it.
--
-- access_refused_since: when the account refused (null: it does not), on the database's clock.
-- access_refused_message: Stripe's answer, or the webhook event that recorded the hold.
-- access_event_created: the `created` time of the newest (de)authorization event applied: Stripe does
--   not order its events, so an older one never overrides a newer one.
ALTER TABLE destination_health
  ADD COLUMN access_refused_since timestamptz,
  ADD COLUMN access_refused_message text,
  ADD COLUMN access_event_created timestamptz;
ALTER TABLE destination_health ADD CONSTRAINT destination_health_access_refused_check
  CHECK (access_refused_since IS NULL OR (account <> '' AND state = 'down'));
