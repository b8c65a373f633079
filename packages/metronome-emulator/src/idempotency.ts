// Metronome's Idempotency-Key header on POST endpoints (the kit's store, @meterbox/emulator-kit): once
// a request with a key begins executing (it passed validation), its answer, a 500 included, is kept for
// at least 24 hours and returned to every later request with that key; the same key with different
// parameters, or while the first request still runs, is a 409. Nothing is kept for a request that
// never began (validation errors, 429s, faults injected before the work), so such calls can be retried.
import { IdempotencyStore as KitStore } from '@meterbox/emulator-kit';
import { conflict } from './errors.js';

export interface SavedAnswer {
  status: number;
  /** undefined: an empty body (what /v1/ingest and setIngestAliases answer on success). */
  body: unknown;
}

export class IdempotencyStore extends KitStore<SavedAnswer> {
  constructor() {
    super({
      mismatch: (key) => conflict(`Idempotency-Key ${key} was already used with different parameters`),
      inProgress: (key) => conflict(`A request with Idempotency-Key ${key} is still in progress`),
    });
  }
}
