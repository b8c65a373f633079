-- API processes cache verified keys in memory (no key lookup on the hot path). Revoking or deleting
-- a key notifies every process listening on `meterbox_api_keys` with the key's hash, at commit, so
-- the cached entry is dropped within the notification's delivery time. A trigger covers every path
-- (admin revoke, organization deletion cascading to its keys, a manual UPDATE by an operator).
CREATE FUNCTION meterbox_notify_api_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('meterbox_api_keys', OLD.key_hash);
  RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_revoked
  AFTER UPDATE OF revoked_at, key_hash, organization_id ON api_keys
  FOR EACH ROW
  WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
        OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
        OR OLD.organization_id IS DISTINCT FROM NEW.organization_id)
  EXECUTE FUNCTION meterbox_notify_api_key_change();

CREATE TRIGGER api_keys_deleted
  AFTER DELETE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION meterbox_notify_api_key_change();
