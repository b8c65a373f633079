// Poison webhook events: signed and well-formed, but carrying data Postgres can never store (a NUL
// character, a number or date out of range, a broken constraint). Retrying cannot help, and a 500
// makes Stripe resend for three days; they are recorded (migration 0013), acknowledged, and listed
// for the operator. Transient failures (database down, deadlock, serialization) still answer 5xx.
import type { Kysely } from 'kysely';
import { sql } from 'kysely';
import { isDatabaseUnavailable, sqlState } from '../db/errors.js';
import type { DB } from '../db/schema.js';
import type { VerifiedEvent } from './verify.js';

/**
 * SQLSTATE classes that no retry changes: 22 data exception (22P05 untranslatable character,
 * 22003 numeric out of range, 22008 datetime overflow, 22021 invalid byte sequence…) and 23
 * integrity constraint violation.
 */
const PERMANENT_CLASSES = ['22', '23'];

/** True when applying the event failed for good: retrying it would fail the same way. */
export function isPoison(err: unknown): boolean {
  if (isDatabaseUnavailable(err)) return false;
  const state = sqlState(err);
  return state !== undefined && PERMANENT_CLASSES.includes(state.slice(0, 2));
}

const MAX_ERROR_LENGTH = 1_000;

/**
 * An event whose `created` no date can hold (JavaScript's range ends in 275760): poison, decided here
 * rather than by sending an invalid Date to Postgres (which pg 9 refuses before the query is sent).
 */
export class EventDateOutOfRangeError extends Error {
  readonly code = '22008'; // datetime_field_overflow, as Postgres would say

  constructor(eventId: string) {
    super(`event ${eventId}: created is out of range`);
    this.name = 'EventDateOutOfRangeError';
  }
}

/** Throws EventDateOutOfRangeError when the event's `created` is no valid date. */
export function assertEventDate(event: Pick<VerifiedEvent, 'id' | 'created'>): void {
  if (Number.isNaN(event.created.getTime())) throw new EventDateOutOfRangeError(event.id);
}

/** Records (or counts again) a poison event; its own short statement, outside the failed transaction. */
export async function recordPoison(db: Kysely<DB>, event: VerifiedEvent, err: unknown): Promise<void> {
  const message = (err instanceof Error ? err.message : String(err)).slice(0, MAX_ERROR_LENGTH);
  await sql`
    INSERT INTO stripe_poison_events (event_id, event_type, error_code, error, payload)
    VALUES (${clean(event.id)}, ${clean(event.type)}, ${sqlState(err) ?? null}, ${clean(message)}, ${clean(event.raw)})
    ON CONFLICT (event_id) DO UPDATE SET deliveries = stripe_poison_events.deliveries + 1`.execute(db);
}

export interface PoisonEvent {
  eventId: string;
  eventType: string;
  errorCode: string | null;
  error: string;
  payload: string;
  receivedAt: Date;
  deliveries: number;
}

/** Newest first. */
export async function listPoisonEvents(db: Kysely<DB>, limit: number): Promise<PoisonEvent[]> {
  const result = await sql<{
    event_id: string;
    event_type: string;
    error_code: string | null;
    error: string;
    payload: string;
    received_at: Date;
    deliveries: number;
  }>`
    SELECT event_id, event_type, error_code, error, payload, received_at, deliveries
      FROM stripe_poison_events ORDER BY received_at DESC, event_id LIMIT ${Math.max(1, Math.min(500, limit))}`.execute(
    db,
  );
  return result.rows.map((r) => ({
    eventId: r.event_id,
    eventType: r.event_type,
    errorCode: r.error_code,
    error: r.error,
    payload: r.payload,
    receivedAt: r.received_at,
    deliveries: r.deliveries,
  }));
}

/** Text columns cannot hold NUL characters. */
function clean(text: string): string {
  return text.replaceAll('\u0000', '\uFFFD');
}
