// Queue set-up: an existing deployment's outbox-sweep queue, created `stately`, is recreated `short`
// (pg-boss cannot change a policy in place), so a sweep killed mid-pass no longer blocks the next.
import { describe, expect, it } from 'vitest';
import { ensureQueues } from '../../src/metering/queues.js';
import { createTestContext } from '../support/database.js';

describe('ensureQueues', () => {
  it('recreates the sweep queue with its new policy; other queues keep theirs', async () => {
    const ctx = await createTestContext();
    await ctx.boss.start();
    await ctx.boss.deleteQueue('outbox-sweep');
    await ctx.boss.createQueue('outbox-sweep', { policy: 'stately', retryLimit: 0 });
    expect((await ctx.boss.getQueue('outbox-sweep'))?.policy).toBe('stately');
    await ensureQueues(ctx.boss, ctx.config);
    expect((await ctx.boss.getQueue('outbox-sweep'))?.policy).toBe('short');
    expect((await ctx.boss.getQueue('meter-delivery'))?.policy).toBe('short');
    // A second start-up changes nothing.
    await ensureQueues(ctx.boss, ctx.config);
    expect((await ctx.boss.getQueue('outbox-sweep'))?.policy).toBe('short');
  });
});
