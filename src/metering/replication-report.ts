// What the database's replication means for exactness, said once at the worker's start-up and by
// `meterbox replication check` (docs/going-live.md, High availability).
import type { Kysely } from 'kysely';
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, processIo } from '../cli/io.js';
import { describeReplication, readReplication } from '../db/replication.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';

/** Logs which replication the database has (none, synchronous, asynchronous, unreadable) and what it means. */
export async function reportReplication(db: Kysely<DB>, waitMs: number, log: Logger): Promise<void> {
  try {
    const described = describeReplication(await readReplication(db), waitMs);
    const entry = { replication: described.mode, details: described.lines };
    if (described.ok) log.info(entry, `database replication: ${described.mode}`);
    else
      log.warn(entry, `database replication: ${described.mode}; see docs/going-live.md, High availability`);
  } catch (err) {
    log.warn({ err }, 'could not read the database replication');
  }
}

export async function replicationCheckCommand(
  ctx: { db: Kysely<DB>; config: { DELIVERY_REPLICA_WAIT_MS: number } },
  io: CliIo = processIo(),
): Promise<number> {
  const described = describeReplication(await readReplication(ctx.db), ctx.config.DELIVERY_REPLICA_WAIT_MS);
  io.out(`${described.ok ? 'ok  ' : 'FAIL'}  replication: ${described.mode}`);
  for (const line of described.lines) io.out(`      ${line}`);
  return described.ok ? 0 : 1;
}

export const replicationCommands: Record<string, CliCommand> = {
  'replication check': {
    summary: 'say which replication the database has and what it means for exactness (exit 0 or 1)',
    usage: 'replication check',
    options: flags([]),
    run: (ctx) => replicationCheckCommand(ctx),
  },
};
