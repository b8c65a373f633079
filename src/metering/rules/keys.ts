// The delivery rules (this folder): everything delivery decides per key, as pure functions of what the
// claim read, what Stripe answered and the time — no I/O, no clock of their own. batch.ts runs the
// statements and calls around them (the shell); the seeded simulation (scripts/sim) drives these same
// functions against models of pg-boss and Stripe and checks the invariants after every step. The
// statements of the delivery steps (claim-statement-sql.ts, settle-sql.ts) implement the rules marked
// "(SQL)" in claim.ts and corrections.ts set-based; the simulation's store implements them from these
// functions, and test/metering/store-agreement.test.ts holds the two equal. This file: what the rules see (a key, its
// claimed group, corrections' facts, an answer); decide-batch.ts: what a batch decides after its calls.
//
// A key is one customer and meter at one destination, within one organization: Stripe allows one call
// in flight per customer per meter, so a key has at most one lease, one group in flight and one pending
// pg-boss job; a Metronome key (its customer an ingest alias) follows the same rules with Metronome's
// limits. The organization is part of the key so that a key's state lives in its organization's shard
// group on Citus; a customer is billed for one organization at a time (linking a customer that another
// organization still has pending rows for waits, src/billing/subscriptions.ts), so the customer, meter
// and destination alone still name at most one key with rows to send, and its job.

import type { Destination, MeterEventName } from '../../db/schema.js';
import type { SendOutcome } from '../stripe-meter.js';

export interface KeyRef {
  /** The organization whose outbox rows the key delivers (its shard group on Citus). */
  organizationId: string;
  customerId: string;
  eventName: MeterEventName;
  /** Where the key's rows are billed; absent: 'stripe' (keys and jobs from before destinations). */
  destination?: Destination;
}

/** A key's destination ('stripe' when it names none). */
export const destinationOf = (k: Pick<KeyRef, 'destination'>): Destination => k.destination ?? 'stripe';

/**
 * The pg-boss singletonKey of a key's job: customer, meter and destination, without the organization
 * (a customer has pending rows in one organization at a time). Stripe keys keep the name they had
 * before destinations (`event:customer`), so jobs queued before an upgrade still match; other
 * destinations are prefixed (`metronome:event:customer`).
 */
export function deliveryKey(
  customerId: string,
  eventName: MeterEventName,
  destination: Destination = 'stripe',
): string {
  return destination === 'stripe'
    ? `${eventName}:${customerId}`
    : `${destination}:${eventName}:${customerId}`;
}

/** The singletonKey of a key's job (deliveryKey). */
export const singletonKeyOf = (k: Omit<KeyRef, 'organizationId'>) =>
  deliveryKey(k.customerId, k.eventName, destinationOf(k));

/** A key's identity within a batch or a model: its organization and its job's singletonKey. */
export const keyName = (k: KeyRef) => `${k.organizationId}/${singletonKeyOf(k)}`;

const REVOKED_PREFIX = 'redriven:';

/**
 * The owner a redrive gives a lease it takes from its batch (redrive.ts, takeKeysFromBatches): the batch's
 * own, prefixed. The key stays leased until the lease's end, as the batch's calls may run until then,
 * but no batch has that owner: the batch's settle, renewals and correction switch are refused.
 */
export const revokedLeaseOwner = (owner: string) => `${REVOKED_PREFIX}${owner}`;

/** The batch a lease was granted to, whether a redrive has revoked it since or not. */
export const leaseGrantedTo = (owner: string) =>
  owner.startsWith(REVOKED_PREFIX) ? owner.slice(REVOKED_PREFIX.length) : owner;

/** The KeyRef of anything that carries one (a claimed key, a job's key), and nothing more. */
export const keyRef = (k: KeyRef): KeyRef =>
  k.destination === undefined || k.destination === 'stripe'
    ? { organizationId: k.organizationId, customerId: k.customerId, eventName: k.eventName }
    : {
        organizationId: k.organizationId,
        customerId: k.customerId,
        eventName: k.eventName,
        destination: k.destination,
      };

/** Keys in the order every statement locks their rows: organization, customer, meter, destination. */
export function compareKeys(a: KeyRef, b: KeyRef): number {
  return (
    compareText(a.organizationId, b.organizationId) ||
    compareText(a.customerId, b.customerId) ||
    compareText(a.eventName, b.eventName) ||
    compareText(destinationOf(a), destinationOf(b))
  );
}

/** Byte order, as Postgres compares text under the C collation and uuids. */
function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The event a key sends next: its identifier, value and timestamp were committed by the claim. */
export interface ClaimedGroup {
  identifier: string;
  value: string;
  timestamp: Date;
  rows: number;
  oldestCreatedAt: Date;
  /** Calls that counted toward the retry limit so far (0 for a new group). */
  attempts: number;
  /** When the identifier was committed: no call with it is older, so the dedupe window starts here. */
  identifiedAt: Date;
  /**
   * No call with this identifier can have been recorded at the destination (migrations/0080): every
   * call since it was committed was definitively refused, or never made. Past the identifier window
   * such a group takes a new identifier instead of failing (decide-batch.ts renewIdentifier).
   */
  renewable?: boolean;
}

export type ClaimedKey = KeyRef &
  (
    | {
        /** This batch holds the key's lease; group is null when it has no usage to send. */
        state: 'leased';
        group: ClaimedGroup | null;
        /** Rows that became `expired` (outside Stripe's window) in this claim. */
        expired: number;
        /** Correction rows are pending (their claim is a second look, made only then). */
        corrections: boolean;
        /** Usage rows are pending beyond `group` (the next hour, more than maxRows, or behind an in-flight group). */
        moreUsage: boolean;
        /**
         * No usage is due beyond `group`, but rows stamped more than the allowance (FUTURE_ALLOWANCE_SECONDS)
         * past the database's clock are pending: the earliest becomes due in this long (by that clock).
         */
        dueInMs?: number;
      }
    /** Another batch holds the lease, the key is paced, or it backs off: look again after waitMs. */
    | { state: 'busy' | 'paced' | 'backoff'; waitMs: number }
    /** The key's meter is not sendable now (missing at Stripe): nothing claimed, nothing spent. */
    | { state: 'held' }
  );

export type LeasedKey = Extract<ClaimedKey, { state: 'leased' }>;

/** A correction group: readings taken back from ONE Stripe event (see corrections.ts). */
export interface CorrectionGroup extends ClaimedGroup {
  /** Cancel the original event by identifier, or send a negative (compensating) event. */
  action: 'cancel' | 'compensate';
  /** The Stripe event (usage group identifier) whose readings were voided. */
  originalIdentifier: string;
}

/** What the correction claim of a key found (only for keys whose claim saw correction rows). */
export interface CorrectionFacts {
  /** The group to send now, or null. */
  group: CorrectionGroup | null;
  /** Rows settled without a call: the original expired (never billed) or its period is invoiced. */
  settled: { neverBilled: number; creditNote: number };
  /** Rows whose original Stripe still validates (v2): they may be sent from this instant. */
  waitUntil: Date | null;
  /** Rows whose original failed: held by name until the original is redriven (no job meanwhile). */
  blocked: number;
  /** Rows whose original usage is still unsent: they can go once it is (the key's usage goes first). */
  waitingOnUsage: number;
}

/** The outcome of one planned event: Stripe's answer, or none (not called: no budget slot or lease time). */
export interface Answer {
  key: KeyRef;
  group: ClaimedGroup;
  correction: boolean;
  outcome: SendOutcome | null;
  /** Not called: when the key may try again. */
  waitMs?: number;
  /**
   * Not called because the destination is down or asked to wait (Retry-After): the key waits on the
   * destination (its retry_at is set to waitMs ahead, uncounted), until an outage's end wakes it.
   */
  destinationWait?: boolean;
  /** Which call of the batch carried it (several events share one v2 or Metronome call). */
  call?: number;
  /**
   * The process was frozen or stalled while the call waited: the answer came after the lease deadline
   * the call started under, which the call's own timeout ends well before, or the process's awake clock
   * (clock.ts, watchStalls) shows it stood still meanwhile (a lease grown by slow claims can outlast a
   * freeze; calls.ts). A timeout or a connection error then is this process's, not the destination's:
   * uncounted toward the group's retry limit and toward an outage (a call that timed out after a freeze
   * is billed once, never failed).
   */
  late?: boolean;
}
