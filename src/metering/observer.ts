// What delivery tells whoever watches it: the worker plugs its Prometheus instruments in here
// (src/worker/delivery-observer.ts), tests count with it.
import type { DatabaseResourceKind } from '../db/errors.js';
import type { ReplicationOutcome } from '../db/replication.js';
import type { MeterEventName } from '../db/schema.js';
import type { SendOutcome } from './stripe-meter.js';

/** Hooks for metrics (the ops engineer plugs prom-client in); every method is optional. */
export interface DeliveryObserver {
  /** One Stripe call finished with this outcome after `ms` milliseconds (per event it carried). */
  onCall?(outcome: SendOutcome['kind'], ms: number, eventName: MeterEventName): void;
  /** Rows settled as delivered (accepted now or found already accepted); lagMs = now - oldest row's created_at. */
  onDelivered?(eventName: MeterEventName, rows: number, lagMs: number): void;
  /** A job will be retried by pg-boss with backoff. */
  onRetry?(eventName: MeterEventName, reason: string): void;
  /** A job went to the dead-letter queue and its group's rows became `failed`. */
  onDeadLetter?(eventName: MeterEventName, reason: string): void;
  /** A call started (+1) or finished (-1). */
  onInFlight?(delta: number): void;
  /** Stripe answered 429 (rate limited). */
  onRateLimited?(eventName: MeterEventName): void;
  /** Rows became `expired` (outside Stripe's 35-day window). */
  onExpired?(eventName: MeterEventName, rows: number): void;
  /** A batch's wait for the standbys after its claim (src/db/replication.ts), and what it found. */
  onReplicationWait?(outcome: ReplicationOutcome, ms: number): void;
  /** The database's timeline changed: a standby was promoted. */
  onTimelineChange?(from: number, to: number): void;
  /** A batch met a database short of a resource (disk, memory, connections) and is run again later. */
  onDatabaseResourceError?(kind: DatabaseResourceKind): void;
  /** A batch waited longer than the pool's connect timeout for a connection of this process and runs again. */
  onPoolExhausted?(): void;
  /** A batch's settle was refused for `keys` keys: its lease had run out (a freeze, a slow statement). */
  onStaleLease?(keys: number): void;
  /** The wait for a call's budget slot woke too late to use it (budget.ts LATE_SLOT_MS): passed slots dropped. */
  onLateSlot?(): void;
}
