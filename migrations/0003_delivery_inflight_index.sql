-- Delivery resumes a group whose identifier was committed before a Stripe call that never got an
-- answer recorded (crash, timeout, retryable error). Finding such a group must not scan a
-- customer's whole pending backlog, so index exactly the pending rows that carry an identifier.
CREATE INDEX meter_outbox_inflight ON meter_outbox (stripe_customer_id, event_name, occurred_at, id)
  WHERE status = 'pending' AND identifier IS NOT NULL;
