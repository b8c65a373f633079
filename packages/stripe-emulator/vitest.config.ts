// The emulator's own tests: no database, no meterbox code, so none of the root's global set-up.
// The root config runs them too, as its `stripe-emulator` project.
import { availableParallelism } from 'node:os';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    name: 'stripe-emulator',
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    pool: 'forks',
    // One worker process for many files rather than one per file (a process start and the emulator's
    // import, about a second each): every file starts and stops its own emulators and changes no
    // environment, mock or global, so nothing a file leaves is seen by the next.
    isolate: false,
    // As many as the root config's FILES_AT_ONCE (vitest runs projects of one group only with the same
    // number; it refuses to start otherwise).
    maxWorkers: Math.max(4, availableParallelism()),
  },
});
