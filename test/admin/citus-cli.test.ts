// `meterbox citus distribute` on plain Postgres: it changes nothing, exits 1 and says Citus is absent
// (the cluster suite, test/citus, runs it on a real cluster).
import { expect } from 'vitest';
import { citusDistributeCommand } from '../../src/admin/citus-cli.js';
import { parseCommandLine } from '../../src/commands.js';
import { memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });

it('exits 1 on plain Postgres, saying Citus is absent, and leaves the tables local', async ({ ctx }) => {
  const io = memoryIo();
  expect(await citusDistributeCommand(ctx, {}, io)).toBe(1);
  expect(io.stderr).toContain('Citus is absent');
  expect(io.stdout).toBe('');
  expect(await ctx.distributed()).toBe(false);
});

it('is registered as `meterbox citus distribute`', () => {
  const line = parseCommandLine(['citus', 'distribute', '--json']);
  expect(line).toMatchObject({ kind: 'run', name: 'citus distribute', values: { json: true } });
});
