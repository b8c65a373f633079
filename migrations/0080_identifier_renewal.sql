-- Holds longer than the identifier window (issue 44, docs/architecture.md "The identifier window"): a
-- group whose identifier is past the window Stripe surely deduplicates it in (meterbox trusts 23 h of
-- Stripe's 24) may take a new identifier, with no operator, when no call made with the old one can have
-- been recorded: every call since the identifier was committed was definitively refused (a 401 or 403
-- on the account or the key, a 429, a timestamp ahead) or never made (a hold's wait). A call that may
-- have been recorded (a timeout, a connection error, a 5xx, or a lease that ended without its batch's
-- settle: the process died after calling) is written on the key row here, on the database's clock: the
-- key's group identified before that instant is not renewed, and fails past the window as before, for
-- a reconciled redrive.
--
-- A key has one group in flight at a time, and every usage call of the key carries that group, so one
-- time per key suffices: the group is renewable when ambiguous_call_at is null or before its
-- identified_at.
--
-- Every existing key is marked now: nothing is known of the calls made before this release, so no group
-- identified before it is renewed. Workers of the previous release, running beside this one during a
-- deploy, do not mark their calls: a group identified during the deploy that one of them sent with an
-- ambiguous answer, then held for more than 23 h, is the one case left (docs/operations.md).
ALTER TABLE meter_delivery_keys ADD COLUMN ambiguous_call_at timestamptz;
UPDATE meter_delivery_keys SET ambiguous_call_at = now();
