// Metronome's Idempotency-Key header on POST endpoints: once a request with a key begins executing
// (it passed validation), its answer, a 500 included, is kept for at least 24 hours and returned to
// every later request with that key; the same key with different parameters, or while the first
// request still runs, is a 409. Nothing is kept for a request that never began (validation errors,
// 429s, faults injected before the work), so such calls can be retried with the same key.
import { createHash } from 'node:crypto';
import { conflict } from './errors.js';

export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;

export interface SavedAnswer {
  status: number;
  /** undefined: an empty body (what /v1/ingest and setIngestAliases answer on success). */
  body: unknown;
}

interface Entry {
  fingerprint: string;
  savedAt: number;
  answer?: SavedAnswer;
}

export type IdempotencyLookup =
  | { kind: 'new'; save(answer: SavedAnswer): void; release(): void }
  | { kind: 'replay'; answer: SavedAnswer }
  | { kind: 'none' };

export class IdempotencyStore {
  private readonly entries = new Map<string, Entry>();

  /** `scope` is the bearer token; `fingerprint` covers route and body. */
  begin(scope: string, key: string | undefined, route: string, body: string, now: number): IdempotencyLookup {
    if (!key) return { kind: 'none' };
    const id = `${scope}\u0000${key}`;
    const fingerprint = createHash('sha256').update(route).update('\u0000').update(body).digest('hex');
    const existing = this.entries.get(id);
    if (existing && now - existing.savedAt < IDEMPOTENCY_TTL_MS) {
      if (existing.fingerprint !== fingerprint) {
        throw conflict(`Idempotency-Key ${key} was already used with different parameters`);
      }
      if (!existing.answer) throw conflict(`A request with Idempotency-Key ${key} is still in progress`);
      return { kind: 'replay', answer: existing.answer };
    }
    const entry: Entry = { fingerprint, savedAt: now };
    this.entries.set(id, entry);
    return {
      kind: 'new',
      save: (answer) => {
        entry.answer = answer;
      },
      release: () => {
        if (!entry.answer && this.entries.get(id) === entry) this.entries.delete(id);
      },
    };
  }

  clear(): void {
    this.entries.clear();
  }
}
