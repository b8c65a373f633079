-- Indexes for the operator views: the metrics scrape's and dashboard's "delivered in the last hour",
-- and reconciliation over all organizations for a period (per-organization uses
-- meter_outbox_organization_occurred from 0001).
CREATE INDEX meter_outbox_delivered_at ON meter_outbox (delivered_at) WHERE status = 'delivered';
CREATE INDEX meter_outbox_occurred_at ON meter_outbox (occurred_at);
