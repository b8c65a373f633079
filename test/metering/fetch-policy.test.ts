// How the fetchers fetch (src/metering/fetch-policy.ts): a batch sized by each destination's own
// account-wide budget, the largest destination's size for the one queue, and the linger only for a
// transport that carries many events a call.
import { describe, expect, it } from 'vitest';
import { type FetchedDestination, fetchPlan } from '../../src/metering/fetch-policy.js';
import { testConfig } from '../support/database.js';

const config = testConfig({ DELIVERY_CONCURRENCY: '4', DELIVERY_MAX_IN_FLIGHT: '200' });
const v1 = (callsPerSecond: number): FetchedDestination => ({
  transport: { maxEventsPerCall: 1 },
  budget: { callsPerSecond, eventsPerSecond: null },
});

describe('fetchPlan', () => {
  it("sizes a batch by its destination's budget: calls the budget starts in about a second, at least 10, at most the in-flight share", () => {
    // 8 calls/s over 4 fetchers: 2 a fetcher, raised to the floor of 10 calls.
    expect(fetchPlan(config, [v1(8)]).batchSize).toBe(10);
    // 100 calls/s: 25 a fetcher.
    expect(fetchPlan(config, [v1(100)]).batchSize).toBe(25);
    // 400 calls/s: 100 a fetcher, capped by DELIVERY_MAX_IN_FLIGHT's share (200 / 4).
    expect(fetchPlan(config, [v1(400)]).batchSize).toBe(50);
  });

  it('takes the largest size of the destinations sharing the queue, and an events budget lowers full calls', () => {
    // 10 events a call; 40 calls/s but 200 events/s: 20 full calls a second, 5 a fetcher -> 10 calls of 10.
    const eventsBound: FetchedDestination = {
      transport: { maxEventsPerCall: 10 },
      budget: { callsPerSecond: 40, eventsPerSecond: 200 },
    };
    expect(fetchPlan(config, [eventsBound]).batchSize).toBe(100);
    expect(fetchPlan(config, [v1(100), eventsBound]).batchSize).toBe(100);
    expect(fetchPlan(config, [v1(400), v1(8)]).batchSize).toBe(50);
  });

  it('gives pg-boss the batch size and the poll interval, and lingers only for a transport of many events a call', async () => {
    const plan = fetchPlan(config, [v1(100)]);
    expect(plan.workOptions).toMatchObject({
      batchSize: 25,
      pollingIntervalSeconds: config.DELIVERY_POLL_INTERVAL_SECONDS,
      // A batch reads a job's id, payload and attempt: the fetch returns pg-boss's minimal columns.
      includeMetadata: false,
    });
    const started = performance.now();
    await plan.gate(1);
    await plan.gate(1);
    expect(performance.now() - started).toBeLessThan(250);
    const many = fetchPlan(config, [
      { transport: { maxEventsPerCall: 100 }, budget: { callsPerSecond: 100, eventsPerSecond: null } },
    ]);
    const first = performance.now();
    await many.gate(1);
    await many.gate(1);
    // The second small batch's fetch waits out the linger after the first (V2_LINGER_MS, 300 ms).
    expect(performance.now() - first).toBeGreaterThanOrEqual(250);
  });
});
