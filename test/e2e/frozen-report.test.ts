// A worker frozen in the middle of the hourly report's meter-delivery-batch job: the job stays
// `active` (it covers nothing for the sweep), so the sweep queues the keys it has not reached yet as
// jobs of their own and the other worker bills them during the freeze; the reaper frees the frozen
// slice's keys once their lease lapses; the worker wakes to finish a job whose keys are gone or taken.
// Each organization billed once, with its count.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import {
  activeSensorEventsByCustomer,
  activeSensorRows,
  batchJobKeyCounts,
  bulkActiveSensors,
  createBulkOrganizations,
} from '../metering/active-sensors-fixtures.js';
import { callTracker, FREEZE_MS, frozenWorkersTest, holdingProxy } from '../support/holding-proxy.js';
import { startWorkerProcess } from '../support/topology.js';
import { waitFor } from '../support/wait.js';

const it = frozenWorkersTest;

describe("a worker frozen holding the hourly report's batch job", () => {
  it('SIGSTOP past the lease mid-job: the sweep hands its keys to the other worker, each organization billed once, one call in flight per key', {
    timeout: 150_000,
  }, async ({ ctx, emulator, startProcess }) => {
    // The report is of the current hour: a test this close to its end waits for the next one.
    const toNextHour = utcHourOf(new Date()).getTime() + 3_600_000 - Date.now();
    if (toNextHour < 120_000) await new Promise((resolve) => setTimeout(resolve, toNextHour + 100));
    const tracker = callTracker();
    const proxies = await Promise.all([
      holdingProxy(emulator.url, tracker, 0),
      holdingProxy(emulator.url, tracker, 1),
    ]);
    // 50 calls a second shared: the report's 600 calls take 12 s or more, so a freeze lands mid-job.
    const workers = await Promise.all(
      proxies.map((p) =>
        startWorkerProcess(startProcess, { STRIPE_API_BASE: p.url, STRIPE_MAX_CALLS_PER_SECOND: '50' }),
      ),
    );
    const n = 600;
    await createBulkOrganizations(ctx.db, n);
    for (let i = 1; i <= n; i++) emulator.createCustomer({ id: `cus_bulk_${i}` });
    const hour = utcHourOf(new Date());
    // The hour's report of these organizations, as a worker's chunk hands it off: one batch job of 600 keys.
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));
    const reportKeys = await batchJobKeyCounts(ctx.db);
    expect(reportKeys.reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(n);

    // The worker whose calls are in flight holds the batch job: frozen past its lease.
    await waitFor('a report call in flight', () => proxies.some((p) => p.awaiting() > 0), 20_000, 1);
    const held = proxies.findIndex((p) => p.awaiting() > 0);
    const { rows: active } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery-batch' AND state = 'active'`.execute(
      ctx.db,
    );
    expect(active[0]?.n).toBeGreaterThanOrEqual(1);
    proxies[held]!.hold();
    process.kill(workers[held]!.pid, 'SIGSTOP');
    await new Promise((r) => setTimeout(r, FREEZE_MS));
    // Meanwhile the sweep queued the frozen job's keys (an active batch job covers nothing), and the other
    // worker delivered them on jobs of their own.
    const { rows: swept } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'meter-delivery' AND singleton_key LIKE 'active_sensors:%' AND state = 'completed'`.execute(
      ctx.db,
    );
    expect(swept[0]?.n).toBeGreaterThan(0);
    proxies[held]!.woke();
    process.kill(workers[held]!.pid, 'SIGCONT');
    await new Promise((r) => setTimeout(r, 1_000));
    proxies[held]!.release();

    const rowsOfHour = async () =>
      (await activeSensorRows(ctx.db)).filter((r) => r.occurred_at.getTime() === hour.getTime());
    const level = await waitFor(
      'every report row delivered',
      async () => {
        const rows = await rowsOfHour();
        return rows.length >= n && rows.every((r) => r.status === 'delivered');
      },
      60_000,
    ).then(
      () => true,
      () => false,
    );
    const events = activeSensorEventsByCustomer(emulator, hour);
    const wrong = Array.from({ length: n }, (_, k) => k + 1).filter(
      (i) => JSON.stringify(events.get(`cus_bulk_${i}`)) !== JSON.stringify([bulkActiveSensors(i)]),
    );
    const stale = workers.map((w) => (w.output.match(/stale lease/g) ?? []).length);
    const timeouts = workers.map((w) => (w.output.match(/"reason":"timeout"/g) ?? []).length);
    const resets = workers.map((w) => (w.output.match(/"reason":"network"/g) ?? []).length);
    console.log(
      `[frozen report] ${n} organizations, worker ${held} frozen ${FREEZE_MS} ms holding the batch job; ` +
        `${swept[0]?.n} keys delivered on the sweep's jobs during the freeze; overlapping calls ${tracker.overlaps.length}, ` +
        `late ${tracker.overlaps.filter((o) => o.late).length}; stale settles refused ${JSON.stringify(stale)}, ` +
        `timed-out calls ${JSON.stringify(timeouts)}, reset ${JSON.stringify(resets)}`,
    );
    const seen = (customers: readonly string[]) =>
      JSON.stringify({
        notes: tracker.notes,
        customers: customers
          .slice(0, 5)
          .map((c) => ({ customer: c, events: events.get(c), calls: tracker.callsTo(c) })),
      });
    // Each organization billed once, with its count: no key lost with the frozen job, none sent twice.
    expect(wrong, seen(wrong.map((i) => `cus_bulk_${i}`))).toEqual([]);
    expect(level).toBe(true);
    // Never two calls at once for one customer and meter, but for a late one (frozen-workers.test.ts).
    const notLate = tracker.overlaps.filter((o) => !o.late);
    expect(notLate, seen(notLate.map((o) => o.customer))).toEqual([]);
    // The freeze caught calls in flight, whose late answers were refused.
    expect([...timeouts, ...resets].reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(stale.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(workers.every((w) => w.alive)).toBe(true);
    for (const p of proxies) p.close();
  });
});
