import { spawn } from 'node:child_process';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { outboxListCommand, outboxRetryCommand, reconcileCommand } from '../../src/admin/cli.js';
import { createProgressBar } from '../../src/cli/progress.js';
import type { Context } from '../../src/context.js';
import {
  createOrganization,
  createSensors,
  memoryIo,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { ROOT, RunningProcess } from '../support/processes.js';
import { seededRandom } from '../support/random.js';
import { contextTest } from '../support/test.js';

const random = seededRandom();

/** Readings plus their outbox row, as ingestion writes them (same transaction, same now()). */
async function ingested(
  ctx: Context,
  organizationId: string,
  customerId: string,
  sensorId: string,
  count: number,
): Promise<void> {
  await ctx.db.transaction().execute(async (trx) => {
    await trx
      .insertInto('temperature_readings')
      .values(
        Array.from({ length: count }, (_, i) => ({
          sensor_id: sensorId,
          recorded_at: new Date(Date.now() - (i + 1) * 1000 - random.next() * 1e6),
          organization_id: organizationId,
          temperature_c: 4,
        })),
      )
      .execute();
    await trx
      .insertInto('meter_outbox')
      .values({
        organization_id: organizationId,
        event_name: 'temperature_readings',
        stripe_customer_id: customerId,
        value: count,
        occurred_at: new Date(),
      })
      .execute();
  });
}

// One organization with a sensor and two ingested batches (4 and 3 readings), written before the
// file's first test.
const it = contextTest().extend(
  'delta',
  { scope: 'file', auto: true },
  async ({ ctx }): Promise<{ org: OrganizationFixture; sensor: string }> => {
    const org = await createOrganization(ctx.db, { name: 'Delta Chill' });
    const [sensor] = (await createSensors(ctx.db, org.organizationId, 1)) as [string];
    await ingested(ctx, org.organizationId, org.customerId, sensor, 4);
    await ingested(ctx, org.organizationId, org.customerId, sensor, 3);
    return { org, sensor };
  },
);

const period = () => ({
  from: new Date(Date.now() - 3_600_000).toISOString(),
  to: new Date(Date.now() + 120_000).toISOString(),
});

describe('meterbox outbox list', () => {
  it('prints a table of the filtered rows', async ({ ctx, delta: { org } }) => {
    const io = memoryIo();
    expect(await outboxListCommand(ctx, { organization: org.organizationId, status: 'pending' }, io)).toBe(0);
    const lines = io.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^\s*ID\s+STATUS\s+METER\s+VALUE/);
    expect(lines.filter((l) => l.includes('temperature_readings'))).toHaveLength(2);
    expect(io.stdout).toContain('2 row(s)');
  });

  it('rejects a bad filter with exit code 2 and the usage', async ({ ctx }) => {
    const io = memoryIo();
    expect(await outboxListCommand(ctx, { status: 'lost' }, io)).toBe(2);
    expect(io.stderr).toContain('usage: meterbox outbox list');
  });
});

describe('meterbox outbox retry', () => {
  it('retries the failed rows of an organization with a progress bar on stderr', async ({
    ctx,
    delta: { org },
  }) => {
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'failed', identifier: sql`'mb_cli_' || id` })
      .where('organization_id', '=', org.organizationId)
      .execute();
    const io = memoryIo(true);
    expect(await outboxRetryCommand(ctx, { organization: org.organizationId }, io)).toBe(0);
    expect(io.stdout).toContain('retried 2 failed row(s); queued 1 delivery job(s)');
    expect(io.stderr).toContain('retrying failed rows [');
    expect(io.stderr).toContain('1/1 100%');
    const statuses = await ctx.db
      .selectFrom('meter_outbox')
      .select('status')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(statuses.map((s) => s.status)).toEqual(['pending', 'pending']);
  });

  it('refuses to run without a selection', async ({ ctx }) => {
    const io = memoryIo();
    expect(await outboxRetryCommand(ctx, {}, io)).toBe(2);
    expect(io.stderr).toContain('give ids, organizationId, or all: true');
  });
});

describe('meterbox reconcile', () => {
  it('prints the reconciliation table and exits 0 without drift', async ({ ctx }) => {
    const io = memoryIo();
    expect(await reconcileCommand(ctx, period(), io)).toBe(0);
    const row = io.stdout.split('\n').find((l) => l.includes('Delta Chill'));
    expect(row?.trim().split(/\s+/).slice(-6)).toEqual(['7', '0', '7', '0', '0', '0']);
    expect(io.stdout).toContain('no drift');
  });

  it('exits 1 and marks the organization when readings lack their outbox row (real CLI process)', async ({
    ctx,
    delta: { org, sensor },
  }) => {
    await ctx.db
      .insertInto('temperature_readings')
      .values({
        sensor_id: sensor,
        recorded_at: new Date(),
        organization_id: org.organizationId,
        temperature_c: 5,
      })
      .execute();
    const { from, to } = period();
    const { code, stdout } = await new RunningProcess(
      spawn(
        process.execPath,
        ['--import', 'tsx', 'src/bin/cli.ts', 'reconcile', '--from', from, '--to', to],
        {
          cwd: ROOT,
          env: { ...process.env, DATABASE_URL: ctx.config.DATABASE_URL, LOG_LEVEL: 'silent' },
        },
      ),
    ).exited;
    expect(code).toBe(1);
    expect(stdout).toMatch(/! Delta Chill .*\s1$/m);
    expect(stdout).toContain('DRIFT FOUND in 1 organization(s)');
  });
});

describe('progress bar', () => {
  it('redraws one line on a terminal and prints a single summary line elsewhere', () => {
    let t = 0;
    const tty = memoryIo(true);
    const bar = createProgressBar(tty.err, 'work', { now: () => t });
    for (let i = 1; i <= 50; i++) {
      t += 10;
      bar.update(i, 50);
    }
    bar.finish();
    // 500 ms of updates at most every 100 ms, plus the final frame.
    expect(tty.stderr.split('\r\x1b[K').length - 1).toBeLessThanOrEqual(8);
    expect(tty.stderr.endsWith('50/50 100%\n')).toBe(true);

    const pipe = memoryIo(false);
    const quiet = createProgressBar(pipe.err, 'work');
    quiet.update(3, 5);
    quiet.update(5, 5);
    quiet.finish();
    expect(pipe.stderr).toBe('work: 5/5\n');
  });
});
