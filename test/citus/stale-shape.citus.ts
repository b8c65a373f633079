// A process that has not yet noticed that its database was moved onto the cluster (docs/scaling.md,
// "Moving a running single-node database onto Citus", step 5): its ingestion group is first written in
// the single-node shape, which Citus fails (its lock on the queued pg-boss job inside the distributed
// statement comes back as "invalid byte sequence for encoding UTF8: 0xff", which would have been a 500);
// the group committer then asks again whether the database
// is distributed and writes the same group in the Citus shape, so the requests are stored and answered,
// and nothing of the failed attempt remains.
import { describe, expect, inject, it } from 'vitest';
import { GroupCommitter } from '../../src/ingest/group-commit.js';
import { openTestContext } from '../support/database.js';
import { createOrganization, createSensors } from '../support/fixtures.js';

const url = inject('citusUrl');

describe.skipIf(!url)('a process that still believes its database is a single node', () => {
  it('writes its ingestion group again in the Citus shape after Citus refuses the single-node one', async () => {
    const { ctx, close } = await openTestContext({ DATABASE_URL: url });
    try {
      await ctx.boss.start();
      const org = await createOrganization(ctx.db);
      const sensors = await createSensors(ctx.db, org.organizationId, 2);
      const asked: boolean[] = [];
      const groups = new GroupCommitter(
        {
          db: ctx.db,
          boss: ctx.boss,
          clock: ctx.clock,
          // A no remembered from before the move, until the committer asks again.
          distributed: async (options) => {
            asked.push(options?.recheck === true);
            return options?.recheck === true;
          },
        },
        { windowMs: 1, maxRequests: 10, maxReadings: 1_000 },
      );
      const at = (secondsAgo: number) => new Date(Date.now() - secondsAgo * 1000).toISOString();
      // Two rounds: the second meets the delivery job the first queued, which the single-node shape
      // locks inside its distributed statement.
      for (const round of [0, 1]) {
        asked.length = 0;
        const outcome = await groups.submit({
          organizationId: org.organizationId,
          readings: sensors.map((sensorId) => ({ sensorId, recordedAt: at(60 + round), temperatureC: 4.2 })),
        });
        expect(outcome).toEqual({ stored: true, result: { inserted: 2, duplicates: 0 } });
        if (round === 1) expect(asked).toEqual([false, true]);
      }
      const stored = await ctx.db
        .selectFrom('temperature_readings')
        .select((eb) => eb.fn.countAll<string>().as('n'))
        .where('organization_id', '=', org.organizationId)
        .executeTakeFirstOrThrow();
      const billed = await ctx.db
        .selectFrom('meter_outbox')
        .select((eb) => eb.fn.sum<string>('value').as('n'))
        .where('organization_id', '=', org.organizationId)
        .executeTakeFirstOrThrow();
      expect([Number(stored.n), Number(billed.n)]).toEqual([4, 4]);
    } finally {
      await close();
    }
  });
});
