// A real full disk: the outbox's table lives on a small tmpfs volume of its own (a tablespace) that is
// filled to the last byte while readings arrive and a worker delivers, then given space again. The WAL
// and the rest of the database keep their room, as with the WAL on its own volume (CloudNativePG's
// layout): Postgres stays up and refuses what must grow the full volume with SQLSTATE 53100. Shows:
// no 500 while the disk is full (503 with Retry-After and "out of disk space"), nothing answered 201
// lost, and every stored reading billed exactly once when space is back. Needs root (mount); skipped,
// loudly, otherwise.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { compareWithEmulator } from '../metering/delivery-helpers.js';
import { authHeaders, createSensors } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const root = process.getuid?.() === 0;
if (!root) {
  console.warn(
    'SKIPPED test/e2e/disk-full.test.ts: mounting a small volume needs root (the injected disk-full test in database-resources.test.ts still runs)',
  );
}

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_disk_full',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '1',
    SWEEP_STALE_SECONDS: '2',
  },
  startWorkers: true,
});

const run = (cmd: string, args: string[]) => {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
};

describe.skipIf(!root)('a full disk under load', () => {
  it('answers 503 (never 500) while the volume is full, loses nothing answered 201, and bills exactly once space is back', {
    timeout: 120_000,
  }, async ({ ctx, app, emulator, org, worker }) => {
    expect(worker).toBeDefined();
    const postgresUser = run('id', ['-u', 'postgres']);
    const postgresGroup = run('id', ['-g', 'postgres']);
    expect(postgresUser.ok && postgresGroup.ok, 'the postgres user runs the server').toBe(true);
    const dir = mkdtempSync(join(tmpdir(), 'meterbox-disk-full-'));
    const mounted = run('mount', [
      '-t',
      'tmpfs',
      '-o',
      `size=8m,mode=0700,uid=${postgresUser.out.trim()},gid=${postgresGroup.out.trim()}`,
      'tmpfs',
      dir,
    ]);
    expect(mounted.ok, mounted.out).toBe(true);
    const space = `meterbox_full_${process.pid}`;
    const filler = join(dir, 'filler');
    try {
      await sql.raw(`CREATE TABLESPACE ${space} LOCATION '${dir}'`).execute(ctx.db);
      // Pages packed full, as before migration 0085: with its 40% of each page kept free, the worker's
      // updates of the few rows accepted after the fill could find room on their page and never meet the
      // full disk this test is about (set before the move, which rewrites the table).
      await sql`ALTER TABLE meter_outbox SET (fillfactor = 100)`.execute(ctx.db);
      await sql.raw(`ALTER TABLE meter_outbox SET TABLESPACE ${space}`).execute(ctx.db);
      const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
      const start = Date.now() - 20 * 60_000;
      let next = 0;
      const statuses = new Map<number, number>();
      let acknowledged = 0;
      const messages = new Set<string>();
      /** One request of 3 readings (new instants each time); counts what was answered. */
      const post = async () => {
        const readings = [0, 1, 2].map(() => ({
          sensorId: sensor,
          recordedAt: new Date(start + next++ * 10).toISOString(),
          temperatureC: 3,
        }));
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({ readings }),
        });
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        const body = (await res.json()) as { inserted?: number; error?: { message: string } };
        if (res.status === 201) acknowledged += body.inserted ?? 0;
        if (res.status === 503) {
          messages.add(body.error!.message);
          expect(res.headers.get('retry-after')).toBe('30');
        }
        return res.status;
      };
      for (let i = 0; i < 20; i++) await post();

      // The volume fills to its last byte.
      run('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k']);
      expect(run('df', ['--output=avail', dir]).out).toMatch(/\n\s*0\s*$/);
      await waitFor(
        'writes refused for the full disk',
        async () => {
          for (let i = 0; i < 5; i++) await post();
          return (statuses.get(503) ?? 0) >= 20;
        },
        60_000,
      );
      // The worker meets the full disk too and waits without spending attempts.
      await waitFor(
        'the worker put off by the full disk',
        async () => {
          const met = (await ctx.metrics.databaseResourceErrors.get()).values.some(
            (v) => v.labels.kind === 'disk_full' && v.labels.process === 'worker' && v.value > 0,
          );
          // Readings keep arriving meanwhile (each a 503).
          if (!met) await post();
          return met;
        },
        30_000,
      );

      // Space is back.
      rmSync(filler);
      for (let i = 0; i < 20; i++) await post();
      expect(statuses.get(500) ?? 0).toBe(0);
      expect([...statuses.keys()].sort()).toEqual([201, 503]);
      expect([...messages]).toEqual(['the database is out of disk space; retry later']);

      const stored = async () =>
        Number(
          (
            await ctx.db
              .selectFrom('temperature_readings')
              .select((eb) => eb.fn.countAll<string>().as('n'))
              .where('sensor_id', '=', sensor!)
              .executeTakeFirstOrThrow()
          ).n,
        );
      expect(await stored()).toBe(acknowledged);
      const billed = () =>
        emulator.totals({ customer: org.customerId, event_name: 'temperature_readings' })[0]?.sum ?? 0;
      await waitFor('every acknowledged reading billed', () => billed() >= acknowledged, 40_000);
      await waitFor('every outbox row settled', async () => {
        const pending = await ctx.db
          .selectFrom('meter_outbox')
          .select('id')
          .where('stripe_customer_id', '=', org.customerId)
          .where('status', '<>', 'delivered')
          .execute();
        return pending.length === 0;
      });
      expect(billed()).toBe(acknowledged);
      const ledger = await compareWithEmulator(ctx.db, emulator);
      expect(ledger.duplicatesAccepted).toEqual([]);
      expect(ledger.valueMismatches).toEqual([]);
      console.info(
        `disk full: ${statuses.get(201)} requests stored (${acknowledged} readings), ${statuses.get(503)} answered 503, 0 answered 500; ${acknowledged} billed`,
      );
    } finally {
      rmSync(filler, { force: true });
      await sql
        .raw('ALTER TABLE meter_outbox SET TABLESPACE pg_default')
        .execute(ctx.db)
        .catch(() => undefined);
      await sql
        .raw(`DROP TABLESPACE IF EXISTS ${space}`)
        .execute(ctx.db)
        .catch(() => undefined);
      run('umount', [dir]);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
