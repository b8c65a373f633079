// The simulation's model of ingestion's hand-off under a name of its own (src/metering/outbox.ts
// handOffName: `<key>#handoff:<job id>`, queued by a retry pass of a transaction that already holds a
// later key's job): a delivery job of its key (its payload) that neither pg-boss's `short` policy nor the
// sweep counts as the key's queued job, and hostile worlds that produce it still hold every invariant.
import { describe, expect, it } from 'vitest';
import { ModelDb } from '../../scripts/sim/model.js';
import { simulate } from '../../scripts/sim/simulation.js';
import { keyName, singletonKeyOf } from '../../src/metering/rules/keys.js';

const BOSS = { retryLimit: 20, retryDelaySeconds: 5, retryDelayMaxSeconds: 3600, expireInSeconds: 300 };
const KEY = {
  organizationId: 'org_1',
  customerId: 'cus_1',
  eventName: 'temperature_readings' as const,
  destination: 'metronome' as const,
};

describe("the simulation's hand-off under a name of its own", () => {
  it('queues a job of the key that the key’s next insert and the sweep do not count as its queued job', () => {
    let t = Date.UTC(2026, 10, 2);
    const db = new ModelDb(
      () => t,
      () => 0.5,
      BOSS,
    );
    const own = singletonKeyOf(KEY);
    const first = db.ingest(KEY, 1n, t, true).job;
    expect(first?.name).toBe(`${own}#handoff:${first?.id}`);
    expect(keyName(first!.key)).toBe(keyName(KEY));
    // The sweep (two minutes on) still takes the key as uncovered: its job is not under the key's name.
    t += 121_000;
    expect(db.staleKeys(120_000, 10).map(keyName)).toEqual([keyName(KEY)]);
    // The key's next ingestion is not refused by it: it queues the key's own job.
    const second = db.ingest(KEY, 2n, t).job;
    expect(second?.name).toBe(own);
    expect(db.staleKeys(120_000, 10)).toEqual([]);
    // And a third is refused, as pg-boss's `short` policy refuses a second queued job of one name.
    expect(db.ingest(KEY, 3n, t).job).toBeNull();
  });

  it('hostile seed 13 queues jobs under hand-off names and holds every invariant', async () => {
    const result = await simulate(13, {}, 'small', { hostile: true });
    expect(result.trace.filter((l) => l.includes('#handoff:')).length).toBeGreaterThan(0);
    expect(result.violations).toEqual([]);
  });
});
