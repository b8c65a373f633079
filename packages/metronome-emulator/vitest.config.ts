// The emulator's own tests: no database, no meterbox code, so none of the root's global set-up.
// The root config runs them too, as its `metronome-emulator` project.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    name: 'metronome-emulator',
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    pool: 'forks',
  },
});
