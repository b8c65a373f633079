-- Stripe refusing the platform's own key (a 401 on a call made without Stripe-Account: the secret key
-- revoked, rolled or mistyped) holds Stripe delivery instead of failing every group it touches (issue
-- 44): the platform's destination_health row (account '') goes down with access_refused_since set, as
-- a connected account's does when it deauthorizes the platform (0074); its groups wait uncounted while
-- one probe at a time asks again, and the first accepted call ends the hold.
ALTER TABLE destination_health DROP CONSTRAINT destination_health_access_refused_check;
ALTER TABLE destination_health ADD CONSTRAINT destination_health_access_refused_check
  CHECK (access_refused_since IS NULL OR state = 'down');
