// A queue's NOTIFY wake-ups routed to a handler of the process (SplitListenDb.routeWakeUps, delivery's
// one idle fetcher): a job sent to the queue calls the handler, and pg-boss no longer wakes every
// worker of the queue (with N delivery fetchers idle, N fetches of which N - 1 found nothing).
import { describe, expect } from 'vitest';
import { SplitListenDb } from '../../src/db/job-queue-db.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();

describe("a queue's wake-ups", () => {
  it('go to the handler routed for the queue, not to every worker of it; back to pg-boss once unrouted', async ({
    ctx,
  }) => {
    const queue = 'wake-ups-routed';
    await ctx.boss.createQueue(queue, { notify: true });
    const db = ctx.boss.getDb();
    expect(db).toBeInstanceOf(SplitListenDb);
    const fetched: string[] = [];
    // Two workers asleep after their first empty fetch: only a wake-up makes them fetch within the test.
    for (let i = 0; i < 2; i++) {
      await ctx.boss.work(
        queue,
        { pollingIntervalSeconds: 60, notifyPollingIntervalSeconds: 60, batchSize: 1 },
        async (jobs) => {
          fetched.push(...jobs.map((j) => j.id));
        },
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
    let woken = 0;
    (db as SplitListenDb).routeWakeUps(queue, () => {
      woken++;
    });
    const first = await ctx.boss.send(queue, {});
    await waitFor('the routed wake-up', () => woken > 0 || undefined, 10_000);
    // The handler woke nothing: the job waits for a worker's poll.
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    expect(woken).toBe(1);
    expect(fetched).toEqual([]);

    (db as SplitListenDb).routeWakeUps(queue, undefined);
    const second = await ctx.boss.send(queue, {});
    await waitFor('both jobs fetched', () => fetched.length === 2 || undefined, 10_000);
    expect(new Set(fetched)).toEqual(new Set([first, second]));
    expect(woken).toBe(1);
    await ctx.boss.offWork(queue);
  });
});
