import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Each file has its own database, so files run in parallel; 2 cores here, more elsewhere.
    fileParallelism: true,
    reporters: process.env.CI ? ['default'] : ['default'],
  },
});
