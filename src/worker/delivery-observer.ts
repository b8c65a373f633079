// Plugs the delivery loop's hooks (src/metering/observer.ts DeliveryObserver) into this process's
// Prometheus instruments. These counters live in the worker process: see metrics-server.ts.
import type { DeliveryObserver } from '../metering/observer.js';
import type { Metrics } from '../observability/metrics.js';

export function metricsDeliveryObserver(metrics: Metrics): DeliveryObserver {
  return {
    onCall(outcome, _ms, eventName) {
      // HTTP-level calls and latency come from the SDK hook (instrumentStripe); this is the meter
      // view, where a 400 "identifier already exists" is a delivery, not an error.
      metrics.meterEventSends.inc({ meter: eventName, outcome });
      if (outcome === 'accepted' || outcome === 'duplicate')
        metrics.meterEventsDelivered.inc({ meter: eventName });
    },
    onDelivered(eventName, rows) {
      metrics.outboxRowsDelivered.inc({ meter: eventName }, rows);
    },
    onRetry(eventName) {
      metrics.deliveryRetries.inc({ meter: eventName });
    },
    onDeadLetter(eventName) {
      metrics.deadLettered.inc({ meter: eventName });
    },
    onInFlight(delta) {
      metrics.deliveryInFlight.inc(delta);
    },
    onRateLimited(eventName) {
      metrics.deliveryRateLimited.inc({ meter: eventName });
    },
    onReplicationWait(outcome, ms) {
      metrics.replicationWaits.inc({ outcome });
      if (outcome !== 'no_standbys') metrics.replicationWaitSeconds.observe(ms / 1000);
    },
    onTimelineChange() {
      metrics.timelineChanges.inc();
    },
    onDatabaseResourceError(kind) {
      metrics.databaseResourceErrors.inc({ kind, process: 'worker' });
    },
    onStaleLease(keys) {
      metrics.staleLeaseSettles.inc(keys);
    },
    onLateSlot() {
      metrics.lateSlots.inc();
    },
    onPoolExhausted() {
      metrics.deliveryPoolExhausted.inc();
    },
  };
}
