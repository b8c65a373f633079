// Stripe's Idempotency-Key layer: the first answer to a key is saved for 24 h and replayed to any
// request with the same key (header `Idempotent-Replayed: true`); the same key with different
// parameters is a 400 idempotency_error. As at Stripe, nothing is saved when the endpoint never ran
// (parameter validation failures, 429s, injected pre-processing faults), so such calls can be retried.
import { createHash } from 'node:crypto';
import { StripeApiError } from './errors.js';

export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;

export interface SavedResponse {
  status: number;
  body: unknown;
  headers: Record<string, string>;
}

interface Entry {
  fingerprint: string;
  savedAt: number;
  response?: SavedResponse;
}

export type IdempotencyLookup =
  | { kind: 'new'; save(response: SavedResponse): void; release(): void }
  | { kind: 'replay'; response: SavedResponse }
  | { kind: 'none' };

export class IdempotencyStore {
  private readonly entries = new Map<string, Entry>();

  /** `scope` is the API key (keys are per account and mode); `fingerprint` covers route and body. */
  begin(scope: string, key: string | undefined, route: string, body: string, now: number): IdempotencyLookup {
    if (!key) return { kind: 'none' };
    if (key.length > 255) {
      throw new StripeApiError(
        400,
        'invalid_request_error',
        'Idempotency keys can be at most 255 characters long.',
      );
    }
    const id = `${scope}\u0000${key}`;
    const fingerprint = createHash('sha256').update(route).update('\u0000').update(body).digest('hex');
    const existing = this.entries.get(id);
    if (existing && now - existing.savedAt < IDEMPOTENCY_TTL_MS) {
      if (existing.fingerprint !== fingerprint) {
        throw new StripeApiError(
          400,
          'idempotency_error',
          `Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '${key}' if you meant to execute a different request.`,
        );
      }
      if (!existing.response) {
        throw new StripeApiError(
          409,
          'idempotency_error',
          'There is currently another in-progress request using this Stripe-Idempotency-Key. Please try again later.',
          'idempotency_key_in_use',
        );
      }
      return { kind: 'replay', response: existing.response };
    }
    const entry: Entry = { fingerprint, savedAt: now };
    this.entries.set(id, entry);
    return {
      kind: 'new',
      save: (response) => {
        entry.response = response;
      },
      release: () => {
        if (!entry.response && this.entries.get(id) === entry) this.entries.delete(id);
      },
    };
  }

  clear(): void {
    this.entries.clear();
  }
}
