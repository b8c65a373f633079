// Whether Postgres's WAL settings fit the hourly report, said once at the worker's start-up and by
// `meterbox wal check` (docs/operations.md, "Postgres's WAL settings"; the sizing in src/db/wal-sizing.ts).
import type { Kysely } from 'kysely';
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, processIo } from '../cli/io.js';
import type { DB } from '../db/schema.js';
import { describeWalSizing, readWalSizing } from '../db/wal-sizing.js';
import type { Logger } from '../log.js';

async function described(db: Kysely<DB>) {
  const { settings, organizations } = await readWalSizing(db);
  return { organizations, ...describeWalSizing(settings, organizations) };
}

/** Logs at info when the settings fit the report of the billable organizations, else warns with each line. */
export async function reportWalSizing(db: Kysely<DB>, log: Logger): Promise<void> {
  try {
    const { ok, organizations, reportWalBytes, lines } = await described(db);
    const entry = { organizations, reportWalBytes, details: lines };
    if (ok) log.info(entry, 'WAL settings fit the hourly report');
    else
      log.warn(
        entry,
        "WAL settings too small for the hourly report; see docs/operations.md, Postgres's WAL settings",
      );
  } catch (err) {
    log.warn({ err }, 'could not read the WAL settings');
  }
}

export async function walCheckCommand(ctx: { db: Kysely<DB> }, io: CliIo = processIo()): Promise<number> {
  const { ok, organizations, reportWalBytes, lines } = await described(ctx.db);
  const mb = Math.ceil(reportWalBytes / (1024 * 1024));
  io.out(
    `${ok ? 'ok  ' : 'FAIL'}  WAL settings for the hourly report of ${organizations} organizations (about ${mb} MB)`,
  );
  for (const line of lines) io.out(`      ${line}`);
  return ok ? 0 : 1;
}

export const walCommands: Record<string, CliCommand> = {
  'wal check': {
    summary: "say whether Postgres's WAL settings fit the hourly report (exit 0 or 1)",
    usage: 'wal check',
    options: flags([]),
    run: (ctx) => walCheckCommand(ctx),
  },
};
