-- Read-only usage tokens (GET /v1/usage only), created by the operator for an organization's
-- customer app: scoped to one organization, expiring, revocable. Like api_keys, only a SHA-256 of
-- the whole token and a short display prefix are stored; the token is shown once. Looked up by hash
-- with nothing else known (a directory table: a reference table on Citus, src/db/citus.ts).
CREATE TABLE usage_tokens (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  name            text NOT NULL DEFAULT 'default',
  prefix          text NOT NULL,
  token_hash      text NOT NULL UNIQUE,
  created_at      timestamptz NOT NULL DEFAULT now(),
  expires_at      timestamptz NOT NULL,
  revoked_at      timestamptz,
  CHECK (expires_at > created_at)
);
CREATE INDEX usage_tokens_organization ON usage_tokens (organization_id, created_at);
