// Stripe's Idempotency-Key layer (the kit's store, @meterbox/emulator-kit): the first answer to a key
// is saved for 24 h and replayed to any request with the same key (header `Idempotent-Replayed: true`);
// the same key with different parameters is a 400 idempotency_error. As at Stripe, nothing is saved
// when the endpoint never ran (parameter validation failures, 429s, injected pre-processing faults),
// so such calls can be retried.
import { IdempotencyStore as KitStore } from '@meterbox/emulator-kit';
import { StripeApiError } from './errors.js';

export interface SavedResponse {
  status: number;
  body: unknown;
  headers: Record<string, string>;
}

export class IdempotencyStore extends KitStore<SavedResponse> {
  constructor() {
    super({
      tooLong: {
        maxLength: 255,
        error: () =>
          new StripeApiError(
            400,
            'invalid_request_error',
            'Idempotency keys can be at most 255 characters long.',
          ),
      },
      mismatch: (key) =>
        new StripeApiError(
          400,
          'idempotency_error',
          `Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '${key}' if you meant to execute a different request.`,
        ),
      inProgress: () =>
        new StripeApiError(
          409,
          'idempotency_error',
          'There is currently another in-progress request using this Stripe-Idempotency-Key. Please try again later.',
          'idempotency_key_in_use',
        ),
    });
  }
}
