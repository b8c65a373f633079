// Idempotency-Key under concurrency on the cluster: the rules' check (test/support/idempotency-race.ts)
// through the app, keyed requests written in their shard group's transaction (routed.ts
// storeKeyedShardGroup).
import { describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { clusterContext } from '../support/citus.js';
import { raceKeyedRequests } from '../support/idempotency-race.js';

const url = inject('citusUrl');

describe.skipIf(!url)('Idempotency-Key under concurrency on the cluster', () => {
  const cluster = clusterContext(url);

  it('stores one answer a key and bills what the writing answers said, whatever the order', async () => {
    expect(await cluster.ctx.distributed()).toBe(true);
    await raceKeyedRequests(cluster.ctx, createApp(cluster.ctx));
  }, 120_000);
});
