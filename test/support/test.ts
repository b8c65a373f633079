// The test kit's vitest fixtures, replacing the per-file set-up preambles. Two builders:
//
//   contextTest(options)  databaseUrl (a fresh database), ctx (a context on it, pg-boss started),
//                         app (createApp on it), login (signs in to the dashboard, for the session
//                         cookie) and org (a fresh billable organization with an API key, per test);
//   stripeTest(options)   the same on a Stripe emulator: emulator, ctx whose Stripe settings point
//                         at it, app, org (also a customer the emulator knows), and the file's
//                         worker(s) when asked for.
//
// Both also give env (the settings of the file's contexts) and startProcess, which starts a real
// entry point with those settings and stops it after the file.
//
// File-scoped fixtures are built on first use and torn down after the file, in reverse order, even
// when a test fails. Builders are called at a file's top level (vitest refuses file-scoped fixtures
// defined inside a describe); a file may call one more than once for contexts of its own.
import {
  type StripeEmulator,
  type StripeEmulatorOptions,
  startStripeEmulator,
} from '@meterbox/stripe-emulator';
import { test as base } from 'vitest';
import { type AppOptions, createApp } from '../../src/api/app.js';
import type { Context, ContextOverrides } from '../../src/context.js';
import { startWorker, type WorkerOptions, type WorkerRuntime } from '../../src/worker/start.js';
import { openTestContext, provisionTestDatabase } from './database.js';
import { createOrganization, signIn } from './fixtures.js';
import { type RunningProcess, startEntryPoint } from './processes.js';

export type TestApp = ReturnType<typeof createApp>;
type Env = Record<string, string | undefined>;

export interface ContextOptions {
  /** Settings on top of the test defaults (DATABASE_URL: a fresh database unless given). */
  env?: Env;
  /** What createContext takes instead of building it (a clock, a Stripe client). */
  overrides?: ContextOverrides;
  /** Start pg-boss, as a request handler that enqueues deliveries needs (default true). */
  startBoss?: boolean;
  /** What createApp takes for the file's `app` (a test seam such as an ingestion group gate). */
  app?: AppOptions;
}

/** Signs in to the dashboard with the context's ADMIN_TOKEN; resolves to the session cookie. */
function dashboardLogin(ctx: Context, app: TestApp): () => Promise<string> {
  return () => {
    const token = ctx.config.ADMIN_TOKEN;
    if (!token) throw new Error('login needs ADMIN_TOKEN in the builder options');
    return signIn(app, token);
  };
}

/**
 * Starts an entry point (`server`, `worker`, …) as a real process configured like the file's
 * contexts, plus `extra`. Whatever still runs when the file ends gets SIGTERM (SIGKILL after 5 s)
 * and is waited for, before the file's database is dropped.
 */
function processStarter(
  env: Env,
  onCleanup: (fn: () => Promise<void>) => void,
): (name: string, extra?: Env) => RunningProcess {
  const running = new Set<RunningProcess>();
  onCleanup(async () => {
    await Promise.all(
      [...running].map(async (p) => {
        p.kill('SIGTERM');
        const kill = setTimeout(() => p.kill('SIGKILL'), 5_000);
        await p.exited;
        clearTimeout(kill);
      }),
    );
  });
  return (name, extra = {}) => {
    const p = startEntryPoint(name, { ...env, ...extra });
    running.add(p);
    void p.exited.then(() => running.delete(p));
    return p;
  };
}

/** The file's database: env's DATABASE_URL when given, else a fresh one dropped after the file. */
async function fileDatabase(
  env: Env | undefined,
  onCleanup: (fn: () => Promise<void>) => void,
): Promise<string> {
  if (env?.DATABASE_URL) return env.DATABASE_URL;
  const { url, drop } = await provisionTestDatabase();
  onCleanup(drop);
  return url;
}

/**
 * A `test` (use it as `it`) whose fixtures are `databaseUrl`, `ctx`, `app` and `org`, on a context built with
 * `options`.
 */
export function contextTest(options: ContextOptions = {}) {
  return (
    base
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('databaseUrl', { scope: 'file' }, async ({}, { onCleanup }) =>
        fileDatabase(options.env, onCleanup),
      )
      .extend(
        'env',
        { scope: 'file' },
        async ({ databaseUrl }): Promise<Env> => ({
          ...options.env,
          DATABASE_URL: databaseUrl,
        }),
      )
      .extend('ctx', { scope: 'file' }, async ({ env }, { onCleanup }) => {
        const { ctx, close } = await openTestContext(env, options.overrides);
        onCleanup(close);
        if (options.startBoss !== false) await ctx.boss.start();
        return ctx;
      })
      .extend('app', { scope: 'file' }, async ({ ctx }) => createApp(ctx, [], options.app))
      .extend('login', { scope: 'file' }, async ({ ctx, app }) => dashboardLogin(ctx, app))
      .extend('startProcess', { scope: 'file' }, async ({ env }, { onCleanup }) =>
        processStarter(env, onCleanup),
      )
      .extend('org', async ({ ctx }) => createOrganization(ctx.db))
  );
}

/**
 * The hourly report's schedule in a stripeTest file unless the file names its own: once a year (midnight,
 * January 1st, UTC). At the default ('0 * * * *') the cron fired at the top of every hour on each
 * supervising file's database and billed each organization's active sensors once more, in the middle of
 * tests that count the calls of their customers. The report has files of its own (active-sensors-job,
 * cron-active-sensors); the worker's start-up report still runs in every file.
 */
const QUIET_METER_CRON = '0 0 1 1 *';

/** The Stripe settings every stripeTest context gets (a file may override any of them in `env`). */
export const EMULATOR_ENV = {
  STRIPE_SECRET_KEY: 'sk_test_meterbox',
  STRIPE_METER_ID_TEMPERATURE_READINGS: 'mtr_emu_temperature_readings',
  STRIPE_METER_ID_ACTIVE_SENSORS: 'mtr_emu_active_sensors',
} as const;

export interface StripeTestOptions extends ContextOptions {
  /** How the file's emulator is started (faults, latency, strict customers, a clock). */
  emulator?: StripeEmulatorOptions;
  /**
   * Worker processes on the file's one database: each has its own context (and pg pool, pg-boss),
   * as separate `node dist/worker.js` processes would. Default 1.
   */
  processes?: number;
  /** Start every process's worker before the file's first test (else when a test names one). */
  startWorkers?: boolean;
  /** Options of process `index`'s worker (a recording transport, an observer). */
  worker?: (ctx: Context, index: number) => WorkerOptions;
  /**
   * The first process supervises pg-boss (maintenance, expiry), as a worker deployment's processes
   * do; default false, like a context of its own.
   */
  supervise?: boolean;
  /** What process `index`'s createContext takes on top of `overrides`. */
  processOverrides?: (index: number) => ContextOverrides;
}

/**
 * A `test` whose fixtures are `emulator`, `ctx`, `app`, `org` and the workers: `worker` (the first
 * process's), `workers` and `contexts` (every process's, when `processes` > 1). Workers run when a
 * test names one, or from the start with `startWorkers`; `ctx` is process 0's context.
 */
export function stripeTest(options: StripeTestOptions = {}) {
  const processes = options.processes ?? 1;
  const overridesOf = (index: number): ContextOverrides => ({
    bossSupervise: options.supervise === true && index === 0,
    ...options.overrides,
    ...options.processOverrides?.(index),
  });
  return (
    base
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('emulator', { scope: 'file' }, async ({}, { onCleanup }): Promise<StripeEmulator> => {
        const emulator = await startStripeEmulator(options.emulator);
        onCleanup(() => emulator.stop());
        return emulator;
      })
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('databaseUrl', { scope: 'file' }, async ({}, { onCleanup }) =>
        fileDatabase(options.env, onCleanup),
      )
      .extend(
        'env',
        { scope: 'file' },
        async ({ emulator, databaseUrl }): Promise<Env> => ({
          ...EMULATOR_ENV,
          METER_CRON: QUIET_METER_CRON,
          ...options.env,
          // A file that names its own Stripe (an emulator in a process of its own:
          // support/emulator-process.ts) keeps it; the fixture's emulator then only idles.
          STRIPE_API_BASE: options.env?.STRIPE_API_BASE ?? emulator.url,
          DATABASE_URL: databaseUrl,
        }),
      )
      .extend('contexts', { scope: 'file' }, async ({ env }, { onCleanup }) => {
        const contexts: Context[] = [];
        const closers: (() => Promise<void>)[] = [];
        // Closed in reverse, after every worker on them has stopped (the workers fixture depends on this one).
        onCleanup(async () => {
          for (const close of closers.reverse()) await close();
        });
        for (let i = 0; i < processes; i++) {
          const { ctx, close } = await openTestContext(env, overridesOf(i));
          closers.push(close);
          contexts.push(ctx);
        }
        if (options.startBoss !== false) for (const ctx of contexts) await ctx.boss.start();
        return contexts;
      })
      .extend('ctx', { scope: 'file' }, async ({ contexts }) => contexts[0] as Context)
      .extend('app', { scope: 'file' }, async ({ ctx }) => createApp(ctx, [], options.app))
      .extend('login', { scope: 'file' }, async ({ ctx, app }) => dashboardLogin(ctx, app))
      .extend('startProcess', { scope: 'file' }, async ({ env }, { onCleanup }) =>
        processStarter(env, onCleanup),
      )
      .extend(
        'workers',
        { scope: 'file', auto: options.startWorkers === true },
        async ({ contexts }, { onCleanup }) => {
          const workers: WorkerRuntime[] = [];
          onCleanup(async () => {
            for (const worker of workers) await worker.stop();
          });
          for (const [i, ctx] of contexts.entries())
            workers.push(await startWorker(ctx, options.worker?.(ctx, i)));
          return workers;
        },
      )
      .extend('worker', { scope: 'file' }, async ({ workers }) => workers[0] as WorkerRuntime)
      .extend('org', async ({ ctx, emulator }) => {
        const org = await createOrganization(ctx.db);
        emulator.createCustomer({ id: org.customerId });
        return org;
      })
  );
}
