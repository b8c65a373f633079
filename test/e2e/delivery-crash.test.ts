// Real worker processes SIGKILLed at random moments while readings keep arriving and the emulator
// injects "accepted, then 500", 500s, 429s and resets. After recovery Stripe's accepted total per
// customer equals the outbox, and no identifier was accepted twice or with another value.

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { ensureQueues } from '../../src/metering/queues.js';
import {
  allSettled,
  compareWithEmulator,
  untilNoLiveLease,
  waitFor,
  writeRows,
} from '../metering/delivery-helpers.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { seededRandom } from '../support/random.js';
import { stripeTest } from '../support/test.js';

const random = seededRandom();

const FAULTS = {
  acceptedThen500Rate: 0.2,
  errorRate: 0.05,
  rateLimitRate: 0.05,
  resetRate: 0.05,
  latencyMs: 20,
  jitterMs: 150,
};

// Retry options are copied from the queue onto each job when it is sent, so the queue must carry
// them before the first commit: jobs sent earlier would back off for minutes (5 s doubling, the
// defaults) and their key with them.
const DELIVERY_ENV = {
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  DELIVERY_RETRY_LIMIT: '1000',
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  SWEEP_INTERVAL_SECONDS: '1',
  SWEEP_STALE_SECONDS: '2',
  // A SIGKILLed worker's leases come free after this; the emulator answers within 200 ms here.
  DELIVERY_LEASE_SECONDS: '5',
};

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

const it = stripeTest({
  emulator: { faults: FAULTS, seed: 7 },
  env: { ...DELIVERY_ENV, STRIPE_SECRET_KEY: 'sk_test_crash' },
})
  // The queue carries the retry options before the first commit (see DELIVERY_ENV).
  .extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('worker crashes', () => {
  it('loses nothing and bills nothing twice when workers are SIGKILLed at random moments', async ({
    ctx,
    emulator,
    startProcess,
  }) => {
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 6; i++) orgs.push(await createOrganization(ctx.db));

    let writing = true;
    let commits = 0;
    const writer = (async () => {
      while (writing) {
        const org = orgs[commits % orgs.length]!;
        const eventName = commits % 5 === 4 ? 'active_sensors' : 'temperature_readings';
        const rows = Array.from({ length: 1 + (commits % 3) }, (_, i) => ({
          value: 1 + i,
          occurredAt: new Date(),
        }));
        await writeRows(ctx.db, ctx.boss, org, eventName, rows);
        commits++;
        await pause(20);
      }
    })();

    // Two workers; one at a time is killed at a random moment and replaced.
    // Worker processes configured like the file's context (DELIVERY_ENV, the emulator).
    const startWorkerProcess = () => startProcess('worker', { LOG_LEVEL: 'warn' });
    const workers = [startWorkerProcess(), startWorkerProcess()];
    let kills = 0;
    // 14 s of kills; then, if the "accepted, then 500" fault has not hit a call yet, on without kills
    // until it has, within a hard cap: on a loaded machine a worker killed every 0.7-2.2 s may spend
    // its whole life starting up (17 calls in 60 s of kills, twice, at load 10), and the emulator's
    // seeded faults reach that kind only after a few dozen calls.
    const until = Date.now() + 14_000;
    const cap = Date.now() + 60_000;
    while (Date.now() < until) {
      await pause(random.between(700, 2_200));
      const victim = random.int(workers.length);
      workers[victim]!.kill('SIGKILL');
      await workers[victim]!.exited;
      kills++;
      workers[victim] = startWorkerProcess();
    }
    while (emulator.counters().acceptedThen500 === 0 && Date.now() < cap) await pause(200);
    writing = false;
    await writer;

    // Recovery: faults off, the survivors (and the sweep) finish the backlog.
    emulator.setFaults({});
    // Generous: on a loaded 2-core CI machine the backlog of retries takes a while to drain.
    await waitFor('every outbox row delivered', () => allSettled(ctx.db), 120_000).catch(
      async (err: unknown) => {
        // Say what is stuck: the pending rows' keys, their jobs, leases and the shared budget.
        const dump = async (query: string) => (await ctx.pool.query(query)).rows;
        console.error('[delivery crash] stuck', {
          pending:
            await dump(`SELECT stripe_customer_id, event_name, identifier, attempts, last_error, count(*)
          FROM meter_outbox WHERE status = 'pending' GROUP BY 1, 2, 3, 4, 5 LIMIT 20`),
          jobs: await dump(`SELECT singleton_key, state, retry_count, start_after, started_on, output
          FROM pgboss.job WHERE name = 'meter-delivery' AND state < 'completed' LIMIT 20`),
          leases: await dump(
            'SELECT *, clock_timestamp() AS now FROM meter_delivery_keys WHERE lease_owner IS NOT NULL',
          ),
          budget: await dump('SELECT *, clock_timestamp() AS now FROM meter_call_budget'),
          workers: workers.map((w) => (w.stdout + w.stderr).slice(-2000)),
        });
        throw err;
      },
    );

    const check = await compareWithEmulator(ctx.db, emulator);
    const counters = emulator.counters();
    console.log(
      `[delivery crash] ${kills} SIGKILLs, ${commits} commits, ${counters.calls} calls, ${counters.accepted} accepted, ` +
        `${counters.acceptedThen500} accepted-then-500, ${counters.duplicate} duplicate answers`,
    );
    expect(kills).toBeGreaterThanOrEqual(5);
    expect(counters.acceptedThen500).toBeGreaterThan(0);
    expect(check.undelivered).toBe(0);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    for (const key of check.perKey.filter((k) => k.key.startsWith('temperature_readings'))) {
      expect(key, key.key).toEqual({ key: key.key, stripe: key.outbox, outbox: key.outbox });
    }
    // active_sensors (formula last): every group landed exactly once, carrying its newest row's count.
    const { rows: groups } = await sql<{ identifier: string; value: string }>`
      SELECT DISTINCT ON (identifier) identifier, value::text FROM meter_outbox
       WHERE event_name = 'active_sensors' ORDER BY identifier, occurred_at DESC, id DESC`.execute(ctx.db);
    const activeEvents = emulator.events({ event_name: 'active_sensors' });
    expect(activeEvents).toHaveLength(groups.length);
    const sent = new Map(activeEvents.map((e) => [e.identifier, e.value]));
    for (const g of groups) expect(sent.get(g.identifier), g.identifier).toBe(Number(g.value));
    // Every lease of a killed worker expires or is taken over and released: within one lease length of
    // the backlog's end, none is left. (Not at once: the last worker killed may have leased a key whose
    // rows were all delivered by then, and nobody needs to take that lease over before it runs out.)
    expect(await untilNoLiveLease(ctx.db, Number(DELIVERY_ENV.DELIVERY_LEASE_SECONDS))).toBe(0);
  }, 180_000);
});
