// What a batch tells whoever watches it: its notes (decideBatch's) and its destination's health,
// to the log and the metrics (observer.ts). Nothing here decides: the rules did.
import type { Destination, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { DeliveryObserver } from './observer.js';
import type { Note } from './rules/decision.js';
import { destinationOf, type KeyRef } from './rules/keys.js';

/** One destination's share of a batch, once decided: what its calls made of the destination's health
 * (when recorded) and its notes. */
export interface BatchReport {
  destination: Destination;
  /** Stripe Connect: the connected account the share went to. */
  account?: string;
  health?: {
    /** The access refusal's message, if an answer was one. */
    refusal?: string;
    /** The destination's failures among the calls. */
    failures: number;
    after: { refused: boolean; wentDown: boolean };
  };
  notes: readonly Note[];
}

/** What a batch tells the log and the metrics, once, after its decision. */
export function reportBatch(deps: { log: Logger; observer?: DeliveryObserver }, batch: BatchReport): void {
  if (batch.health) reportHealth(deps.log, batch, batch.health);
  reportNotes(deps, batch.notes);
}

/** What a batch's notes say, to the log and the metrics. */
function reportNotes(deps: { log: Logger; observer?: DeliveryObserver }, notes: readonly Note[]): void {
  const observer = deps.observer ?? {};
  const held = new Set<MeterEventName>();
  const corrections = { neverBilled: 0, creditNote: 0 };
  const at = (key: KeyRef, identifier?: string) =>
    deps.log.child({
      customerId: key.customerId,
      eventName: key.eventName,
      destination: destinationOf(key),
      ...(identifier ? { identifier } : {}),
    });
  for (const note of notes) {
    switch (note.kind) {
      case 'delivered':
        at(note.key, note.group.identifier).debug(
          {
            rows: note.group.rows,
            value: note.group.value,
            attempts: note.group.attempts + 1,
            duplicate: note.duplicate,
            lagMs: note.lagMs,
          },
          'meter event delivered',
        );
        observer.onDelivered?.(note.key.eventName, note.group.rows, note.lagMs);
        break;
      case 'accepted':
        at(note.key, note.group.identifier).debug(
          { rows: note.group.rows, lagMs: note.lagMs },
          'meter event accepted; Stripe validates it',
        );
        observer.onDelivered?.(note.key.eventName, note.group.rows, note.lagMs);
        break;
      case 'expired':
        if (note.atClaim) {
          at(note.key).warn({ rows: note.rows }, "outbox rows expired: older than Stripe's 35-day window");
        } else {
          at(note.key).warn({ rows: note.rows, error: note.message }, 'meter event expired at Stripe');
        }
        observer.onExpired?.(note.key.eventName, note.rows);
        break;
      case 'retry':
        at(note.key, note.group.identifier).warn(
          {
            reason: note.reason,
            error: note.message,
            attempts: note.group.attempts + 1,
            backoffMs: note.backoffMs,
          },
          'meter event will be retried',
        );
        observer.onRetry?.(note.key.eventName, note.reason);
        break;
      case 'rate_limited':
        observer.onRateLimited?.(note.key.eventName);
        break;
      case 'dead_letter':
        at(note.key, note.group.identifier).error(
          { reason: note.reason, error: note.message },
          'meter event failed; job dead-lettered',
        );
        observer.onDeadLetter?.(note.key.eventName, note.reason);
        break;
      case 'renewed':
        at(note.key, note.group.identifier).info(
          { rows: note.group.rows, identifiedAt: note.group.identifiedAt.toISOString() },
          'identifier past the window and never recorded (a long hold): its rows take a new identifier',
        );
        break;
      case 'held':
        held.add(note.key.eventName);
        break;
      case 'destination_wait':
        at(note.key).debug({ waitMs: note.waitMs }, 'waiting on the destination (down, or Retry-After)');
        break;
      case 'corrections_settled':
        corrections.neverBilled += note.neverBilled;
        corrections.creditNote += note.creditNote;
        break;
    }
  }
  if (corrections.neverBilled + corrections.creditNote > 0) {
    deps.log.warn(corrections, 'usage corrections settled without a Stripe call');
  }
  if (held.size > 0)
    deps.log.debug({ held: [...held] }, 'no usable Stripe meter: keys held until the meter is back');
}

/** What recording a batch's calls made of its destination (or connected account), to the log. */
function reportHealth(log: Logger, at: BatchReport, health: NonNullable<BatchReport['health']>): void {
  const { after } = health;
  const where = { destination: at.destination, ...(at.account ? { account: at.account } : {}) };
  if (after.refused && !at.account) {
    log.error(
      { destination: at.destination, message: health.refusal },
      "Stripe refused the platform's API key (401): Stripe delivery is held (pending, uncounted) and probed until the key works again; fix STRIPE_SECRET_KEY (a worker started with the fixed key probes at once)",
    );
  } else if (after.refused) {
    log.warn(
      { ...where, message: health.refusal },
      'connected account refused the platform access: its deliveries are held (pending, uncounted) and it is probed until it grants access again',
    );
  } else if (after.wentDown) {
    log.warn(
      { ...where, failures: health.failures },
      'destination down: its groups wait on it and stop spending attempts; probing it',
    );
  }
}
