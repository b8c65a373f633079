// Idempotency-Key under concurrency on the cluster: the rules' check (test/support/idempotency-race.ts)
// through the app, keyed requests written in their shard group's transaction (routed.ts
// storeKeyedShardGroup).
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import { openTestContext } from '../support/database.js';
import { raceKeyedRequests } from '../support/idempotency-race.js';

const url = inject('citusUrl');

describe.skipIf(!url)('Idempotency-Key under concurrency on the cluster', () => {
  let ctx: Context;
  let close: () => Promise<void>;

  beforeAll(async () => {
    ({ ctx, close } = await openTestContext({ DATABASE_URL: url }));
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  it('stores one answer a key and bills what the writing answers said, whatever the order', async () => {
    expect(await ctx.distributed()).toBe(true);
    await raceKeyedRequests(ctx, createApp(ctx));
  }, 120_000);
});
