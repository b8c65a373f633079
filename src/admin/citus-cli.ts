// `meterbox citus distribute`: places meterbox's tables on a Citus cluster (src/db/citus.ts). Run on
// the coordinator after the migrations; idempotent. On plain Postgres it exits 1 saying so.
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, processIo } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { CitusAbsentError, distributeTables, localTables, type Placement } from '../db/citus.js';

function describe(placement: Placement): string {
  switch (placement.kind) {
    case 'reference':
      return 'reference table (a copy on every node)';
    case 'single-shard':
      return 'single-shard table';
    case 'distributed':
      return `distributed by ${placement.column}${placement.colocateWith ? `, co-located with ${placement.colocateWith}` : ''}`;
  }
}

export async function citusDistributeCommand(
  ctx: Pick<Context, 'pool'>,
  values: Record<string, string | boolean | undefined>,
  io: CliIo = processIo(),
): Promise<number> {
  const client = await ctx.pool.connect();
  try {
    const result = await distributeTables(client);
    const local = await localTables(client);
    if (values.json) {
      io.out(JSON.stringify({ ...result, local }, null, 2));
      return 0;
    }
    for (const { table, placement, ms } of result.distributed)
      io.out(`${table.padEnd(24)} ${describe(placement)} (${ms} ms, rows included)`);
    for (const table of result.truncated)
      io.out(
        `${table.padEnd(24)} local copy of its rows emptied on the coordinator (they are in its shards)`,
      );
    io.out(
      result.distributed.length === 0 && result.truncated.length === 0
        ? `nothing to do: ${result.alreadyDistributed.length} tables already distributed`
        : `${result.distributed.length} table(s) distributed, ${result.alreadyDistributed.length} already were; ` +
            `tables locked for ${result.lockedMs} ms (lock taken at attempt ${result.lockAttempts})`,
    );
    io.out(`local on the coordinator: ${local.join(', ') || 'none'} (pg-boss keeps its own schema there)`);
    return 0;
  } catch (err) {
    if (err instanceof CitusAbsentError) {
      io.err.write(`meterbox: ${err.message}\n`);
      return 1;
    }
    throw err;
  } finally {
    client.release();
  }
}

export const citusCommands: Record<string, CliCommand> = {
  'citus distribute': {
    summary: 'distribute the tables over a Citus cluster (on the coordinator, after migrations; idempotent)',
    usage: 'citus distribute [--json]',
    options: flags([], ['json']),
    run: (ctx, { values }) => citusDistributeCommand(ctx, values),
  },
};
