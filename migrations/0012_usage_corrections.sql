-- Usage corrections (issue 15): voiding readings of a faulty sensor and taking back from Stripe
-- exactly what had been billed for them.

-- One row per correction request. The counts are those of the transaction that voided the readings.
CREATE TABLE usage_corrections (
  id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  sensor_id               uuid,
  range_from              timestamptz NOT NULL,
  range_to                timestamptz NOT NULL CHECK (range_to > range_from),
  reason                  text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
  readings_voided         integer NOT NULL,
  billed_readings_voided  integer NOT NULL,
  -- Billed readings whose outbox row had not been sent yet: its value was lowered in place.
  unsent_readings_removed integer NOT NULL DEFAULT 0,
  created_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_corrections_organization ON usage_corrections (organization_id, id);

-- A voided reading stays (audit) and keeps its primary key, so re-sending it is a duplicate and is
-- never billed again; usage and reconciliation leave it out.
ALTER TABLE temperature_readings ADD COLUMN voided_at timestamptz;
ALTER TABLE temperature_readings ADD COLUMN correction_id bigint;

-- Correction rows in the outbox: kind = 'correction', value = billed readings to take back (kept
-- positive: the column's CHECK stays), corrects_outbox_id = the usage row that billed them (whose
-- identifier is the Stripe event to cancel or compensate), occurred_at = that row's occurred_at, so
-- the compensation lands in the hour (and billing period) of the original usage.
-- correction_action is decided when the group is claimed (before any Stripe call) and never changes:
-- 'cancel' (meter event adjustment of the original identifier) or 'compensate' (a negative event).
-- credit_note_required: the original usage's invoice is already final; nothing is sent (status
-- 'expired'), the operator issues a credit note.
ALTER TABLE meter_outbox ADD COLUMN kind text NOT NULL DEFAULT 'usage'
  CHECK (kind IN ('usage', 'correction'));
ALTER TABLE meter_outbox ADD COLUMN correction_id bigint REFERENCES usage_corrections (id);
ALTER TABLE meter_outbox ADD COLUMN corrects_outbox_id bigint;
ALTER TABLE meter_outbox ADD COLUMN correction_action text
  CHECK (correction_action IN ('cancel', 'compensate'));
ALTER TABLE meter_outbox ADD COLUMN credit_note_required boolean NOT NULL DEFAULT false;
ALTER TABLE meter_outbox ADD CONSTRAINT meter_outbox_correction_shape CHECK (
  (kind = 'usage' AND correction_id IS NULL AND corrects_outbox_id IS NULL)
  OR (kind = 'correction' AND correction_id IS NOT NULL AND corrects_outbox_id IS NOT NULL));
CREATE INDEX meter_outbox_correction_pending ON meter_outbox (stripe_customer_id, event_name, occurred_at, id)
  WHERE status = 'pending' AND kind = 'correction';
CREATE INDEX meter_outbox_correction ON meter_outbox (correction_id) WHERE correction_id IS NOT NULL;
