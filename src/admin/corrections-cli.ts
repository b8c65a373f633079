// `meterbox usage correct` and `meterbox usage corrections`: usage corrections from the command line
// (the same functions as POST/GET /admin/organizations/{id}/usage-corrections).
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, formatTable, processIo, str } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { AppError } from '../http/errors.js';
import { correctionBody, createCorrection, listCorrections, previewCorrection } from './corrections.js';

type Values = Record<string, string | boolean | undefined>;

export const CORRECT_USAGE =
  'usage correct --organization <id> [--sensor <id>] --from <iso> --to <iso> --reason <text> [--dry-run] [--json]';
export const LIST_CORRECTIONS_USAGE = 'usage corrections --organization <id> [--json]';

function fail(io: CliIo, err: unknown, usage: string): number {
  if (err instanceof AppError) {
    const details = err.details.map((d) => `\n  ${d.field ? `${d.field}: ` : ''}${d.message}`).join('');
    io.err.write(`meterbox: ${err.message}${details}\n`);
    return err.status === 404 ? 1 : 2;
  }
  io.err.write(`meterbox: ${err instanceof Error ? err.message : String(err)}\nusage: meterbox ${usage}\n`);
  return 1;
}

export async function usageCorrectCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const organizationId = str(values, 'organization');
  const parsed = correctionBody.safeParse({
    sensorId: str(values, 'sensor'),
    from: str(values, 'from'),
    to: str(values, 'to'),
    reason: str(values, 'reason'),
  });
  if (!organizationId || !parsed.success) {
    const why = !organizationId
      ? '--organization is required'
      : parsed.error?.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
    io.err.write(`meterbox: ${why}\nusage: meterbox ${CORRECT_USAGE}\n`);
    return 2;
  }
  const options = { now: ctx.clock.now(), retentionDays: ctx.config.READINGS_RETENTION_DAYS };
  try {
    if (values['dry-run'] === true) {
      const preview = await previewCorrection(ctx.db, organizationId, parsed.data, options);
      if (values.json) io.out(JSON.stringify(preview, null, 2));
      else {
        io.out(
          formatTable(
            ['SENSOR', 'READINGS', 'BILLED'],
            preview.bySensor.map((s) => [s.sensorId, String(s.readings), String(s.billed)]),
            new Set([1, 2]),
          ),
        );
        io.out(
          `dry run: would void ${preview.readingsToVoid} reading(s), ${preview.billedReadingsToVoid} of them billed, in [${preview.from}, ${preview.to}); nothing changed`,
        );
      }
      return 0;
    }
    const correction = await ctx.db
      .transaction()
      .execute((trx) => createCorrection(trx, ctx.boss, organizationId, parsed.data, options));
    io.out(
      values.json
        ? JSON.stringify({ correction }, null, 2)
        : `correction ${correction.id}: voided ${correction.readingsVoided} reading(s), ${correction.billedReadingsVoided} billed (${correction.unsentReadingsRemoved} not yet sent, removed in place; the rest credited through the outbox)`,
    );
    return 0;
  } catch (err) {
    return fail(io, err, CORRECT_USAGE);
  }
}

export async function usageCorrectionsCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const organizationId = str(values, 'organization');
  if (!organizationId) {
    io.err.write(`meterbox: --organization is required\nusage: meterbox ${LIST_CORRECTIONS_USAGE}\n`);
    return 2;
  }
  const corrections = await listCorrections(ctx.db, organizationId);
  if (values.json) {
    io.out(JSON.stringify({ corrections }, null, 2));
    return 0;
  }
  io.out(
    formatTable(
      [
        'ID',
        'CREATED',
        'SENSOR',
        'FROM',
        'TO',
        'VOIDED',
        'BILLED',
        'CREDITED',
        'PENDING',
        'CREDIT NOTE',
        'REASON',
      ],
      corrections.map((c) => [
        c.id,
        c.createdAt.slice(0, 19).replace('T', ' '),
        c.sensorId ?? 'all',
        c.from,
        c.to,
        String(c.readingsVoided),
        String(c.billedReadingsVoided),
        String(c.delivery.delivered + c.unsentReadingsRemoved),
        String(c.delivery.pending),
        String(c.creditNoteReadings),
        c.reason.slice(0, 40),
      ]),
      new Set([0, 5, 6, 7, 8, 9]),
    ),
  );
  return 0;
}

export const correctionCommands: Record<string, CliCommand> = {
  'usage correct': {
    summary:
      "void an organization's readings in [from, to) and credit what was billed (--dry-run to preview)",
    usage: CORRECT_USAGE,
    options: flags(['organization', 'sensor', 'from', 'to', 'reason'], ['dry-run', 'json']),
    run: (ctx, { values }) => usageCorrectCommand(ctx, values),
  },
  'usage corrections': {
    summary: "list an organization's usage corrections and their credits",
    usage: LIST_CORRECTIONS_USAGE,
    options: flags(['organization'], ['json']),
    run: (ctx, { values }) => usageCorrectionsCommand(ctx, values),
  },
};
