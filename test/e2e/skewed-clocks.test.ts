// Hosts whose wall clocks are wrong (libfaketime; their monotonic clock true), against one database:
// the database's clock decides everything processes share. A worker 20 minutes ahead or 90 minutes
// behind, next to a right one, bills the ledger exactly and stamps its hourly report with the
// database's hour; an API host 10 minutes behind stores a correct reading, and one 40 minutes ahead
// does not take a reading 30 minutes in the future.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { startParallel } from '../../src/admin/destinations.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { activeSensorRows } from '../metering/active-sensors-fixtures.js';
import { allSettled, compareWithEmulator, waitFor, writeRows } from '../metering/delivery-helpers.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { ROOT } from '../support/processes.js';
import { stripeTest } from '../support/test.js';

const LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1';

/** A process's environment that moves its wall clock by `offset` (libfaketime: "+20m", "-90m"). */
const skewed = (offset: string) => ({
  LD_PRELOAD: LIBFAKETIME,
  FAKETIME: offset,
  // As production hosts are: a wrong wall clock, a true monotonic clock.
  FAKETIME_DONT_FAKE_MONOTONIC: '1',
});

const it = stripeTest({
  emulator: { faults: { errorRate: 0.05, latencyMs: 10, jitterMs: 50 }, seed: 11 },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_skewed',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_RETRY_LIMIT: '1000',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '1',
    SWEEP_STALE_SECONDS: '2',
    DELIVERY_LEASE_SECONDS: '5',
  },
})
  // The queue carries the retry options before the first commit (see delivery-crash.test.ts).
  .extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

if (!existsSync(LIBFAKETIME))
  console.warn(
    `\n[skewed clocks] SKIPPED: ${LIBFAKETIME} missing (Debian's libfaketime; .ci/run installs it); wrong host clocks are not tested here\n`,
  );

describe.skipIf(!existsSync(LIBFAKETIME))('hosts whose clocks are wrong', () => {
  for (const offset of ['+20m', '-90m']) {
    it(`a worker ${offset} next to a right one: the ledger exact, every report stamped with the database's hour`, async ({
      ctx,
      emulator,
      startProcess,
    }) => {
      const orgs: OrganizationFixture[] = [];
      for (let i = 0; i < 4; i++) {
        const org = await createOrganization(ctx.db);
        await createSensors(ctx.db, org.organizationId, 1 + i);
        orgs.push(org);
      }
      const hourOfDatabase = async () =>
        (await sql<{ h: Date }>`SELECT date_trunc('hour', clock_timestamp()) AS h`.execute(ctx.db)).rows[0]!
          .h;
      const hoursBefore = await hourOfDatabase();

      const start = (skew: boolean) =>
        startProcess('worker', { LOG_LEVEL: 'warn', ...(skew ? skewed(offset) : {}) });
      const workers = [start(true), start(false)];

      let writing = true;
      let commits = 0;
      const writer = (async () => {
        while (writing) {
          const org = orgs[commits % orgs.length]!;
          await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
            { value: 1 + (commits % 3), occurredAt: new Date() },
          ]);
          commits++;
          await pause(15);
        }
      })();
      // Each worker is killed and replaced once while readings arrive (its leases lapse, its keys move).
      for (const i of [0, 1]) {
        await pause(3_000);
        workers[i]!.kill('SIGKILL');
        await workers[i]!.exited;
        workers[i] = start(i === 0);
      }
      await pause(3_000);
      writing = false;
      await writer;

      await waitFor('every outbox row delivered', () => allSettled(ctx.db), 90_000).catch(
        async (err: unknown) => {
          // Say what is stuck: the pending rows' keys, their jobs and leases, the workers' last words.
          const dump = async (query: string) => (await ctx.pool.query(query)).rows;
          console.error('[skewed clocks] stuck', {
            pending:
              await dump(`SELECT stripe_customer_id, event_name, identifier, attempts, last_error, count(*)
            FROM meter_outbox WHERE status <> 'delivered' GROUP BY 1, 2, 3, 4, 5 LIMIT 20`),
            jobs: await dump(`SELECT singleton_key, state, retry_count, start_after, started_on, output
            FROM pgboss.job WHERE name = 'meter-delivery' AND state < 'completed' LIMIT 20`),
            keys: await dump('SELECT *, clock_timestamp() AS now FROM meter_delivery_keys LIMIT 20'),
            workers: workers.map((w) => w.output.slice(-3000)),
          });
          throw err;
        },
      );
      for (const w of workers) w.kill('SIGTERM');
      await Promise.all(workers.map((w) => w.exited));
      const check = await compareWithEmulator(ctx.db, emulator);
      expect(check.undelivered).toBe(0);
      expect(check.duplicatesAccepted).toEqual([]);
      expect(check.valueMismatches).toEqual([]);
      for (const key of check.perKey)
        expect(key, key.key).toEqual({ key: key.key, stripe: key.outbox, outbox: key.outbox });
      expect(commits).toBeGreaterThan(20);

      // Every start-up report (four starts, two of them on the skewed host) is stamped with the
      // database's hour (the test may straddle an hour: then either of the two).
      const hours = new Set([hoursBefore.getTime(), (await hourOfDatabase()).getTime()]);
      const ours = new Set(orgs.map((o) => o.organizationId));
      const reports = (await activeSensorRows(ctx.db)).filter((r) => ours.has(r.organization_id));
      expect(reports.length).toBeGreaterThanOrEqual(orgs.length);
      expect(reports.filter((r) => !hours.has(r.occurred_at.getTime())).map((r) => r.occurred_at)).toEqual(
        [],
      );
    }, 180_000);
  }

  it("an operator's host 90 minutes behind cuts over at the database's next hour boundary, not one in the past", async ({
    ctx,
    env,
  }) => {
    const org = await createOrganization(ctx.db);
    const cli = (...args: string[]) =>
      new Promise<{ code: number | null; out: string }>((resolve) => {
        const child = spawn(process.execPath, ['--import', 'tsx', 'src/bin/cli.ts', ...args], {
          cwd: ROOT,
          env: { ...process.env, ...env, LOG_LEVEL: 'warn', ...skewed('-90m') },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let out = '';
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
        });
        child.stderr.on('data', (d: Buffer) => {
          out += d.toString();
        });
        child.once('close', (code) => resolve({ code, out }));
      });
    // The parallel run (in-process: starting one asks Metronome for the customer first).
    await startParallel(ctx.db, org.organizationId, 'metronome', { now: ctx.clock.now() });
    const cut = await cli('destinations', 'cut-over', '--organization', org.organizationId);
    expect(cut.code, cut.out).toBe(0);
    const at = new Date(/cut-over at (\S+)/.exec(cut.out)?.[1] ?? 'none');
    const dbNow = (await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(ctx.db)).rows[0]!.now;
    expect(at.getTime() % 3_600_000).toBe(0);
    // The database's next boundary (the boundary chosen may leave a short lead: at most two hours on).
    expect(at.getTime()).toBeGreaterThan(dbNow.getTime());
    expect(at.getTime() - dbNow.getTime()).toBeLessThanOrEqual(2 * 3_600_000);
  }, 60_000);

  it('an API host 10 minutes behind stores a correct reading; one 40 minutes ahead refuses a reading 30 minutes in the future', async ({
    ctx,
    startProcess,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensorId] = await createSensors(ctx.db, org.organizationId, 1);
    const post = async (offset: string, recordedAt: Date) => {
      const api = startProcess('server', { PORT: '0', ...skewed(offset) });
      await api.waitForOutput('meterbox API listening');
      const url = /"url":"(http:\/\/[^"]+)"/.exec(api.stdout)?.[1];
      const res = await fetch(`${url}/v1/readings`, {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({
          readings: [{ sensorId, recordedAt: recordedAt.toISOString(), temperatureC: 4 }],
        }),
      });
      api.kill('SIGTERM');
      await api.exited;
      return { status: res.status, body: await res.text() };
    };
    const dbNow = (await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(ctx.db)).rows[0]!.now;

    const behind = await post('-10m', dbNow);
    expect(behind.status, behind.body).toBe(201);
    const stored = await ctx.db
      .selectFrom('temperature_readings')
      .select(['recorded_at'])
      .where('sensor_id', '=', sensorId!)
      .execute();
    expect(stored.map((r) => r.recorded_at.getTime())).toEqual([new Date(dbNow.toISOString()).getTime()]);

    const ahead = await post('+40m', new Date(dbNow.getTime() + 30 * 60_000));
    expect(ahead.status, ahead.body).toBe(422);
  }, 120_000);
});
