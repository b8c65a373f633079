// The test kit's vitest fixtures, replacing the per-file set-up preamble (a context on a fresh
// database, pg-boss started, the app): `ctx` and `app` are built once per file on first use and
// torn down after it; `org` is a fresh billable organization with an API key for each test.
import { test as base } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { ContextOverrides } from '../../src/context.js';
import { openTestContext } from './database.js';
import { createOrganization } from './fixtures.js';

export type TestApp = ReturnType<typeof createApp>;

export interface ContextOptions {
  /** Settings on top of the test defaults (DATABASE_URL: a fresh database unless given). */
  env?: Record<string, string | undefined>;
  /** What createContext takes instead of building it (a clock, a Stripe client). */
  overrides?: ContextOverrides;
  /** Start pg-boss, as a request handler that enqueues deliveries needs (default true). */
  startBoss?: boolean;
}

/**
 * A `test` (use it as `it`) whose fixtures are `ctx`, `app` and `org`, on a context built with
 * `options`. One call per file: the context is the file's.
 */
export function contextTest(options: ContextOptions = {}) {
  return (
    base
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('ctx', { scope: 'file' }, async ({}, { onCleanup }) => {
        const { ctx, close } = await openTestContext(options.env, options.overrides);
        onCleanup(close);
        if (options.startBoss !== false) await ctx.boss.start();
        return ctx;
      })
      .extend('app', { scope: 'file' }, async ({ ctx }) => createApp(ctx))
      .extend('org', async ({ ctx }) => createOrganization(ctx.db))
  );
}
