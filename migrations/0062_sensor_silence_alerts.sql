-- Per-sensor silence alerts (issue 45: "an organization (or a sensor) that reported in the last N hours
-- and has been silent for M"), opt-in per organization so that a large fleet does not flood its
-- operator: a row here turns them on for the organization. silence_state (0045) already keys a silence
-- by (organization_id, sensor_id); its sensor rows belong to organizations listed here.
CREATE TABLE alert_sensor_silence (
  organization_id  uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
  enabled_at       timestamptz NOT NULL DEFAULT now()
);
