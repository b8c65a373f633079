// The delivery policy a transport runs under, the constants the rules share and the identifier window
// (the backoff its delays give is computed beside the retry rule: decide-batch.ts, backoffMs).

import type { Config } from '../../config.js';
import type { Destination } from '../../db/schema.js';

export interface DeliveryPolicy {
  /** DELIVERY_RETRY_LIMIT: a group is called at most retryLimit + 1 times (429s do not count). */
  retryLimit: number;
  retryDelayMs: number;
  retryDelayMaxMs: number;
  /** DELIVERY_MIN_INTERVAL_MS: a key's next call starts at least this long after its last answer. */
  minIntervalMs: number;
  /** v2: Stripe validates after its 200 for this long (0: a 200 is final). */
  validationMs: number;
  /** How long the destination surely deduplicates an identifier (Stripe: 24 h, less a margin). */
  identifierWindowMs: number;
  leaseMs: number;
}

/** The policy DELIVERY_* settings give a transport: Stripe's v1 or v2, or Metronome's ingest. */
export function deliveryPolicy(
  config: Pick<
    Config,
    | 'DELIVERY_RETRY_LIMIT'
    | 'DELIVERY_RETRY_DELAY_SECONDS'
    | 'DELIVERY_RETRY_DELAY_MAX_SECONDS'
    | 'DELIVERY_MIN_INTERVAL_MS'
    | 'DELIVERY_V2_VALIDATION_SECONDS'
    | 'DELIVERY_LEASE_SECONDS'
  >,
  transport: 'v1' | 'v2' | 'metronome',
): DeliveryPolicy {
  return {
    retryLimit: config.DELIVERY_RETRY_LIMIT,
    retryDelayMs: Math.max(1, config.DELIVERY_RETRY_DELAY_SECONDS) * 1000,
    retryDelayMaxMs: config.DELIVERY_RETRY_DELAY_MAX_SECONDS * 1000,
    minIntervalMs: config.DELIVERY_MIN_INTERVAL_MS,
    // Metronome answers ingest synchronously: its 200 is final, as Stripe v1's.
    validationMs: transport === 'v2' ? config.DELIVERY_V2_VALIDATION_SECONDS * 1000 : 0,
    identifierWindowMs:
      transport === 'metronome' ? METRONOME_IDENTIFIER_WINDOW_MS : STRIPE_IDENTIFIER_WINDOW_MS,
    leaseMs: config.DELIVERY_LEASE_SECONDS * 1000,
  };
}

// ─── constants the rules share ─────────────────────────────────────────────────────────────────

/** Stripe deduplicates an identifier for at least 24 h; meterbox trusts 23 (retries, clock skew). */
export const STRIPE_IDENTIFIER_WINDOW_MS = 23 * 3600 * 1000;
/**
 * Metronome deduplicates a transaction_id for 34 days; meterbox trusts 33 (retries, clock skew). Its
 * rows expire at 34 days less an hour after their usage time, so in practice a Metronome group is
 * never past its window while it can still be sent.
 */
export const METRONOME_IDENTIFIER_WINDOW_MS = 33 * 24 * 3600 * 1000;
/** The identifier window meterbox trusts at each destination (what `deliveryPolicy` gives its transports). */
export const IDENTIFIER_WINDOW_MS: Readonly<Record<Destination, number>> = {
  stripe: STRIPE_IDENTIFIER_WINDOW_MS,
  metronome: METRONOME_IDENTIFIER_WINDOW_MS,
};
/** When another batch holds the key, look again after at most this long (its follow-up usually comes first). */
export const BUSY_RETRY_MS = 1_000;
/** After a 429, the key's group is resent this soon (the shared budget has slowed down meanwhile). */
export const RATE_LIMITED_RETRY_MS = 2_000;

export const PAST_WINDOW_REASON = 'identifier_window';
