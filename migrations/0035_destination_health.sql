-- A destination's outages, handled as one (issue 44): one row per destination and account, shared by
-- every worker process. While a destination fails every call (5xx, timeouts, connection errors from
-- several groups), delivery stops spending each group's attempts and backoff on it: the destination is
-- `down`, groups wait on it, and one probe call at a time (next_probe_at, on the database's clock)
-- finds out when it is back; then the waiting groups resume together. Kept apart from the call budget
-- (meter_call_budget): the budget paces calls, this row says whether a call can succeed at all.
--
-- account: '' for the destination's own account (a connected account, when one is billed, its id).
-- failures / failing_keys: consecutive failures that are the destination's, and (some of) the keys
--   they came from; any answer that shows the destination working (a 2xx, a 4xx about an event) resets them.
-- retry_after_until: the destination asked (Retry-After on a 429 or a 503) not to be called before then.
CREATE TABLE destination_health (
  destination        text NOT NULL CHECK (destination IN ('stripe', 'metronome')),
  account            text NOT NULL DEFAULT '',
  state              text NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'down')),
  down_since         timestamptz,
  failures           integer NOT NULL DEFAULT 0,
  failing_keys       text[] NOT NULL DEFAULT '{}',
  next_probe_at      timestamptz,
  probes             integer NOT NULL DEFAULT 0,
  retry_after_until  timestamptz,
  outages            bigint NOT NULL DEFAULT 0,
  updated_at         timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (destination, account),
  CHECK ((state = 'down') = (down_since IS NOT NULL))
);
INSERT INTO destination_health (destination) VALUES ('stripe'), ('metronome');
