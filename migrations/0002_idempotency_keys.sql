-- Idempotency-Key storage for POST /v1/readings: the first successful answer to a key, written in
-- the same transaction as the readings it reports, so a crash can never keep one without the other.

CREATE TABLE idempotency_keys (
  organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
  -- SHA-256 (hex) of the request (method, path, body bytes): the same key with another body is a 409.
  request_hash     text NOT NULL,
  response_status  integer NOT NULL,
  response_body    jsonb NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, key)
);
-- Pruning expired keys (IDEMPOTENCY_KEY_RETENTION_HOURS) is one range delete over this index.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
