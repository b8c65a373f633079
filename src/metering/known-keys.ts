// The delivery keys a worker process has seen with a key row (claimBatch): key rows are never deleted,
// so a key seen once needs no insert of its row before later claims. Bounded: a process that has seen
// more keys forgets the oldest it learned, which costs only a look-up before their next claim.
import { type KeyRef, keyName } from './rules/keys.js';

/**
 * 100,000 keys: the largest report measured (docs/benchmarks.md), at roughly 150 bytes a name and
 * entry, about 15 MB of a worker's heap at most.
 */
export const KNOWN_KEYS_LIMIT = 100_000;

export interface KnownKeys {
  has(key: KeyRef): boolean;
  add(key: KeyRef): void;
}

export function knownKeys(limit = KNOWN_KEYS_LIMIT): KnownKeys {
  const names = new Set<string>();
  return {
    has: (key) => names.has(keyName(key)),
    add(key) {
      const name = keyName(key);
      if (names.has(name)) return;
      names.add(name);
      // A Set iterates in insertion order: the first name is the oldest learned.
      if (names.size > limit) for (const oldest of names) return void names.delete(oldest);
    },
  };
}

/**
 * The process's keys seen with a row: every store of the process (sqlStores) shares them, so a batch
 * never looks up a key another batch of the process has claimed.
 */
export const processKnownKeys: KnownKeys = knownKeys();
