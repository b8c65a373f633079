// Gates a test holds a timing condition with, instead of hoping a window, timer or scheduler
// produces it on a loaded machine.
import type { GroupGate } from '../../src/ingest/group-commit.js';

export interface IngestGroupGate extends GroupGate {
  /** Holds the next group open (past its window) until `requests` more requests have joined it. */
  expect(requests: number): void;
  /**
   * Resolves once `n` of the expected requests have joined: a test whose outcome depends on which
   * request joined first sends that one, waits for it, then sends the rest.
   */
  joinedAtLeast(n: number): Promise<void>;
}

/** A gate for createApp's `ingestGroupGate`: lets every group close at its window until told otherwise. */
export function ingestGroupGate(): IngestGroupGate {
  let awaited = 0;
  let joined = 0;
  let waiters: { n: number; resolve: () => void }[] = [];
  return {
    expect(requests) {
      awaited = requests;
      joined = 0;
      waiters = [];
    },
    joined() {
      if (awaited > 0) awaited--;
      joined++;
      for (const w of waiters.filter((w) => joined >= w.n)) w.resolve();
      waiters = waiters.filter((w) => joined < w.n);
    },
    mayClose: () => awaited === 0,
    joinedAtLeast(n) {
      return joined >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve }));
    },
  };
}

/** A promise the test opens by hand: what waits on `opened` proceeds only once `open()` is called. */
export function manualGate(): { opened: Promise<void>; open(): void; readonly isOpen: boolean } {
  let open!: () => void;
  let isOpen = false;
  const opened = new Promise<void>((resolve) => {
    open = () => {
      isOpen = true;
      resolve();
    };
  });
  return {
    opened,
    open,
    get isOpen() {
      return isOpen;
    },
  };
}
