-- The W3C trace context (traceparent) of the request that wrote an outbox row, so the worker's
-- delivery span joins the request's trace (OpenTelemetry, docs/operations.md "Tracing a reading").
-- NULL when no tracing SDK is configured (the API's no-op spans have no valid context) and on rows
-- written before. Expand-only: a nullable column without a default, no table rewrite.
ALTER TABLE meter_outbox ADD COLUMN traceparent text;
