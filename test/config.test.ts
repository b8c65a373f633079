import { describe, expect, it } from 'vitest';
import {
  ConfigError,
  directDatabaseUrl,
  loadConfig,
  longestRetrySpanSeconds,
  requireDatabaseUrl,
  retiredSettingWarnings,
} from '../src/config.js';
import { createStripeClient } from '../src/context.js';
import { callsPerSecond } from '../src/metering/budget.js';
import { stripeDestination } from '../src/metering/stripe-destination.js';
import { runEntryPoint } from './support/processes.js';

describe('loadConfig', () => {
  it('applies the documented defaults and freezes the result', () => {
    const config = loadConfig({});
    expect(config.PORT).toBe(3000);
    expect(config.HOST).toBe('127.0.0.1');
    expect(config.LOG_LEVEL).toBe('info');
    expect(config.METER_CRON).toBe('0 * * * *');
    expect(config.READINGS_MAX_BATCH).toBe(1000);
    expect(config.DELIVERY_CONCURRENCY).toBe(8);
    expect(Object.isFrozen(config)).toBe(true);
  });

  it('defaults delivery at scale: 100 in flight, 10 s leases (renewed while a batch runs), v1, and a call budget by key mode', () => {
    const config = loadConfig({});
    expect(config.DELIVERY_MAX_IN_FLIGHT).toBe(800);
    expect(config.DELIVERY_LEASE_SECONDS).toBe(10);
    expect(config.DELIVERY_TRANSPORT).toBe('v1');
    expect(config.STRIPE_MAX_CALLS_PER_SECOND).toBeUndefined();
    expect(callsPerSecond(config)).toBe(20);
    expect(callsPerSecond(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' }))).toBe(20);
    expect(callsPerSecond(loadConfig({ STRIPE_SECRET_KEY: 'rk_test_x' }))).toBe(20);
    expect(callsPerSecond(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x' }))).toBe(700);
    expect(callsPerSecond(loadConfig({ STRIPE_SECRET_KEY: 'rk_live_x' }))).toBe(700);
    expect(
      callsPerSecond(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x', STRIPE_MAX_CALLS_PER_SECOND: '500' })),
    ).toBe(500);
  });

  it('chooses the transport from DELIVERY_TRANSPORT: v1 one event per call, v2 up to 100', () => {
    const stripe = createStripeClient(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' }))!;
    const v1 = stripeDestination(loadConfig({}), stripe).transport;
    expect([v1.kind, v1.maxEventsPerCall]).toEqual(['v1', 1]);
    const v2 = stripeDestination(loadConfig({ DELIVERY_TRANSPORT: 'v2' }), stripe).transport;
    expect([v2.kind, v2.maxEventsPerCall]).toEqual(['v2', 100]);
  });

  it('treats empty strings as unset', () => {
    const config = loadConfig({ STRIPE_SECRET_KEY: '', ADMIN_TOKEN: '  ' });
    expect(config.STRIPE_SECRET_KEY).toBeUndefined();
    expect(config.ADMIN_TOKEN).toBeUndefined();
  });

  it.each([
    ['PORT', 'eighty'],
    ['PORT', '70000'],
    ['LOG_LEVEL', 'loud'],
    ['METER_CRON', 'every hour'],
    ['DATABASE_URL', 'mysql://x'],
    ['STRIPE_API_BASE', 'not a url'],
    ['ADMIN_TOKEN', 'short'],
    ['DELIVERY_CONCURRENCY', '0'],
    ['DELIVERY_MAX_IN_FLIGHT', '0'],
    ['DELIVERY_LEASE_SECONDS', '0'],
    // Shorter than a budget wait and a call: a call could outlive its lease.
    ['DELIVERY_LEASE_SECONDS', '4'],
    ['STRIPE_MAX_CALLS_PER_SECOND', 'fast'],
    ['STRIPE_MAX_CALLS_PER_SECOND', '0'],
    ['DELIVERY_TRANSPORT', 'v3'],
  ])('rejects a bad %s naming the variable', (variable, value) => {
    expect(() => loadConfig({ [variable]: value })).toThrow(ConfigError);
    try {
      loadConfig({ [variable]: value });
    } catch (err) {
      expect((err as ConfigError).issues.map((i) => i.variable)).toContain(variable);
      expect((err as Error).message).toContain(variable);
    }
  });

  it('names each retired HEAP_* setting that is set, with the Node flag that replaces it', () => {
    expect(retiredSettingWarnings({})).toEqual([]);
    expect(retiredSettingWarnings({ HEAP_OLD_SPACE_MB: ' ', HEAP_YOUNG_SPACE_MB: '' })).toEqual([]);
    expect(retiredSettingWarnings({ HEAP_OLD_SPACE_MB: '384', HEAP_YOUNG_SPACE_MB: '16' })).toEqual([
      "HEAP_OLD_SPACE_MB is no longer read (the heap is sized by Node's flags): use Node's flag --max-old-space-size=384 (command line or NODE_OPTIONS)",
      "HEAP_YOUNG_SPACE_MB is no longer read (the heap is sized by Node's flags): use Node's flag --max-semi-space-size=5 (command line or NODE_OPTIONS)",
    ]);
    expect(retiredSettingWarnings({ HEAP_OLD_SPACE_MB: '0' })).toEqual([
      "HEAP_OLD_SPACE_MB is no longer read (the heap is sized by Node's flags): remove it: without --max-old-space-size Node sizes the heap from the host's memory",
    ]);
    expect(retiredSettingWarnings({ HEAP_YOUNG_SPACE_MB: 'big' })).toEqual([
      "HEAP_YOUNG_SPACE_MB is no longer read (the heap is sized by Node's flags): use Node's flag --max-semi-space-size=<MB> (command line or NODE_OPTIONS)",
    ]);
    // Retired settings are not validated any more: an old value never stops a start.
    expect(() => loadConfig({ HEAP_OLD_SPACE_MB: '12', HEAP_YOUNG_SPACE_MB: 'x' })).not.toThrow();
  });

  it('requires DATABASE_URL for production entry points', () => {
    expect(() => requireDatabaseUrl(loadConfig({}))).toThrow(/DATABASE_URL/);
    expect(requireDatabaseUrl(loadConfig({ DATABASE_URL: 'postgres://a@b/c' }))).toBe('postgres://a@b/c');
  });

  it('takes the session connection from DATABASE_DIRECT_URL, else DATABASE_URL, and checks its shape', () => {
    const pooled = 'postgres://a@pgbouncer:6432/c';
    expect(directDatabaseUrl(loadConfig({ DATABASE_URL: pooled }))).toBe(pooled);
    expect(directDatabaseUrl(loadConfig({ DATABASE_URL: pooled, DATABASE_DIRECT_URL: '' }))).toBe(pooled);
    expect(
      directDatabaseUrl(
        loadConfig({ DATABASE_URL: pooled, DATABASE_DIRECT_URL: 'postgresql://a@db:5432/c' }),
      ),
    ).toBe('postgresql://a@db:5432/c');
    expect(() => loadConfig({ DATABASE_URL: pooled, DATABASE_DIRECT_URL: 'mysql://a@db/c' })).toThrow(
      /DATABASE_DIRECT_URL: must be a postgres:\/\/ connection string/,
    );
  });
});

describe('entry points', () => {
  it.each(['server', 'worker', 'migrate'])(
    '%s exits 1 naming DATABASE_URL when it is unset',
    async (name) => {
      const result = await runEntryPoint(name, { DATABASE_URL: '' });
      expect(result.code).toBe(1);
      expect(result.stderr).toContain('DATABASE_URL');
    },
  );

  it('exits 1 naming the variable on a bad value', async () => {
    const result = await runEntryPoint('server', { DATABASE_URL: 'postgres://x@127.0.0.1:1/x', PORT: 'abc' });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('PORT');
  });
});

describe('the retry settings and the identifier window', () => {
  it("refuses retry settings whose retries could outlast Stripe's identifier window, naming the variable", () => {
    // 60 retries capped at an hour: ~90 h of backoff, far past the 24 h Stripe deduplicates for.
    expect(() => loadConfig({ DELIVERY_RETRY_LIMIT: '60' })).toThrow(/DELIVERY_RETRY_LIMIT.*past the 20 h/);
    // The defaults (20 retries, 5 s doubling to an hour) span about 12 h.
    expect(longestRetrySpanSeconds(loadConfig({})) / 3600).toBeLessThan(13);
  });
});
