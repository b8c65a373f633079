// An Idempotency-Key store as both destinations keep one: the first answer to a key is kept for 24 h
// and returned to every later request with that key (per caller: `scope` is the API key or token);
// the same key with other parameters, or while the first request still runs, is refused with the
// destination's own error. Nothing is kept for a request that never began (validation errors, 429s,
// faults injected before the work): `release` forgets it, so such calls can be retried with the key.
import { createHash } from 'node:crypto';

export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;

export type IdempotencyLookup<A> =
  | { kind: 'new'; save(answer: A): void; release(): void }
  | { kind: 'replay'; answer: A }
  | { kind: 'none' };

/** The destination's refusals, thrown from begin(). */
export interface IdempotencyErrors {
  /** A key longer than the destination takes (checked only when given). */
  tooLong?: { maxLength: number; error: () => Error };
  /** The key was first used with other parameters. */
  mismatch: (key: string) => Error;
  /** The first request with the key has not answered yet. */
  inProgress: (key: string) => Error;
}

interface Entry<A> {
  fingerprint: string;
  savedAt: number;
  answer?: A;
}

export class IdempotencyStore<A> {
  private readonly entries = new Map<string, Entry<A>>();

  constructor(private readonly errors: IdempotencyErrors) {}

  /** `scope` is the caller's credential; `fingerprint` covers route and body. */
  begin(
    scope: string,
    key: string | undefined,
    route: string,
    body: string,
    now: number,
  ): IdempotencyLookup<A> {
    if (!key) return { kind: 'none' };
    const tooLong = this.errors.tooLong;
    if (tooLong && key.length > tooLong.maxLength) throw tooLong.error();
    const id = `${scope}\u0000${key}`;
    const fingerprint = createHash('sha256').update(route).update('\u0000').update(body).digest('hex');
    const existing = this.entries.get(id);
    if (existing && now - existing.savedAt < IDEMPOTENCY_TTL_MS) {
      if (existing.fingerprint !== fingerprint) throw this.errors.mismatch(key);
      if (!existing.answer) throw this.errors.inProgress(key);
      return { kind: 'replay', answer: existing.answer };
    }
    const entry: Entry<A> = { fingerprint, savedAt: now };
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
