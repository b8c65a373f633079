-- Scheduled reconciliation (issue 25): per Stripe customer, meter and UTC hour, what meterbox
-- delivered against what Stripe's meter event summaries count. A row exists while they differ (and
-- after, with resolved_at, as the record); the worker writes it, the dashboard and metrics read it.
CREATE TABLE reconciliation_drift (
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL,
  hour                timestamptz NOT NULL,
  -- Delivered by meterbox for the hour (sum: usage minus corrections; last: the hour's last value).
  sent                bigint NOT NULL,
  -- Stripe's aggregated value for the hour.
  counted             bigint NOT NULL,
  -- Delivered outbox rows of the hour turned `failed` so the operator's redrive resends them.
  rows_failed         integer NOT NULL DEFAULT 0,
  detected_at         timestamptz NOT NULL DEFAULT now(),
  checked_at          timestamptz NOT NULL DEFAULT now(),
  resolved_at         timestamptz,
  PRIMARY KEY (stripe_customer_id, event_name, hour)
);

-- The open drift (what metrics and the dashboard show) without scanning the resolved history.
CREATE INDEX reconciliation_drift_open ON reconciliation_drift (hour) WHERE resolved_at IS NULL;
