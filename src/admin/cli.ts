// `meterbox outbox list|retry` and `meterbox reconcile`: the admin outbox and reconciliation functions
// from the command line. Tables on stdout (--json for one JSON document), progress on stderr.
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, formatTable, processIo, str, usageError, zodMessage } from '../cli/io.js';
import { createProgressBar } from '../cli/progress.js';
import type { Context } from '../context-type.js';
import { listOutbox, outboxListQuery, redriveDepsOf, retryFailed, retrySelection } from './outbox.js';
import { type ReconciliationReport, reconcile, reconcileQuery } from './reconcile.js';

type Values = Record<string, string | boolean | undefined>;

const LIST_USAGE =
  'outbox list [--status pending|delivered|failed|expired] [--organization <id>] [--meter <name>] [--from <iso>] [--to <iso>] [--limit n] [--cursor c] [--json]';

export async function outboxListCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const parsed = outboxListQuery.safeParse({
    status: str(values, 'status'),
    organizationId: str(values, 'organization'),
    meter: str(values, 'meter'),
    from: str(values, 'from'),
    to: str(values, 'to'),
    limit: str(values, 'limit'),
    cursor: str(values, 'cursor'),
  });
  if (!parsed.success) return usageError(io, zodMessage(parsed.error), LIST_USAGE);
  const page = await listOutbox(ctx.db, parsed.data);
  if (values.json) {
    io.out(JSON.stringify(page, null, 2));
    return 0;
  }
  io.out(
    formatTable(
      ['ID', 'STATUS', 'METER', 'VALUE', 'ATTEMPTS', 'ORGANIZATION', 'CREATED', 'LAST ERROR'],
      page.rows.map((r) => [
        r.id,
        r.status,
        r.meter,
        r.value,
        String(r.attempts),
        r.organizationId,
        r.createdAt.slice(0, 19).replace('T', ' '),
        (r.lastError ?? '').slice(0, 60),
      ]),
      new Set([0, 3, 4]),
    ),
  );
  io.out(page.nextCursor ? `more: --cursor ${page.nextCursor}` : `${page.rows.length} row(s)`);
  return 0;
}

const RETRY_USAGE =
  'outbox retry (--id <id>[,<id>…] | --organization <id> | --all) [--meter <name>] [--reconcile] [--json]';

export async function outboxRetryCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const ids = str(values, 'id')
    ?.split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  const parsed = retrySelection.safeParse({
    ids,
    organizationId: str(values, 'organization'),
    meter: str(values, 'meter'),
    all: values.all === true ? true : undefined,
    reconcile: values.reconcile === true ? true : undefined,
  });
  if (!parsed.success) return usageError(io, zodMessage(parsed.error), RETRY_USAGE);
  const bar = createProgressBar(io.err, 'retrying failed rows');
  const result = await retryFailed(
    ctx.db,
    ctx.boss,
    parsed.data,
    (done, total) => bar.update(done, total),
    parsed.data.reconcile ? await redriveDepsOf(ctx) : undefined,
  );
  bar.finish();
  if (values.json) {
    io.out(JSON.stringify(result));
  } else {
    io.out(`retried ${result.retried} failed row(s); queued ${result.jobs} delivery job(s)`);
    const r = result.reconciled;
    if (r) {
      io.out(
        `reconciled with the destinations (${r.calls} call(s)): ${r.delivered.length} group(s) found there and marked delivered, ${r.reissued.length} missing and queued under a new identifier, ${r.ambiguous.length} left failed`,
      );
      if (r.ambiguous.length > 0) {
        io.out(
          formatTable(
            ['IDENTIFIER', 'DESTINATION', 'CUSTOMER', 'METER', 'WINDOW', 'WHY'],
            r.ambiguous.map((g) => [g.identifier, g.destination, g.customerId, g.meter, g.window, g.reason]),
          ),
        );
      }
    }
    if (result.refused.length > 0) {
      io.out(
        `${result.refused.length} group(s) NOT resent: their identifiers are past the destination's dedupe window, so a resend could bill twice`,
      );
      io.out(
        formatTable(
          ['IDENTIFIER', 'DESTINATION', 'CUSTOMER', 'METER', 'KIND', 'ROWS', 'IDENTIFIED AT'],
          result.refused.map((g) => [
            g.identifier,
            g.destination,
            g.customerId,
            g.meter,
            g.kind,
            String(g.rows),
            g.identifiedAt,
          ]),
          new Set([5]),
        ),
      );
      if (!r) io.out('run again with --reconcile to compare them with the destination first');
    }
  }
  // Exit 1 while groups are left failed, so a script notices what was not redriven.
  return result.refused.length > 0 ? 1 : 0;
}

const RECONCILE_USAGE = 'reconcile --from <iso> --to <iso> [--organization <id>] [--skip-stripe] [--json]';

const n = (v: number | null | undefined): string => (v === null || v === undefined ? '-' : String(v));

export function formatReconciliation(report: ReconciliationReport): string {
  const stripe = report.stripe === 'compared';
  const headers = ['ORGANIZATION', 'STORED', 'DELIVERED', 'PENDING', 'FAILED', 'EXPIRED', 'DRIFT'];
  if (stripe) headers.push('STRIPE', 'STRIPE DRIFT', 'SENSORS DRIFT');
  const rows = report.organizations.map((o) => {
    const row = [
      `${o.hasDrift ? '! ' : '  '}${o.organizationName} (${o.organizationId.slice(0, 8)})`,
      n(o.readingsStored),
      n(o.usage.delivered),
      n(o.usage.pending),
      n(o.usage.failed),
      n(o.usage.expired),
      o.drift === null ? 'not metered' : n(o.drift),
    ];
    if (stripe) {
      row.push(
        o.stripe?.error ? 'error' : n(o.stripe?.readings),
        n(o.stripe?.drift),
        n(o.stripe?.activeSensorsDrift),
      );
    }
    return row;
  });
  const right = new Set(headers.map((_, i) => i).filter((i) => i > 0));
  const lines = [`period ${report.from} – ${report.to}`, formatTable(headers, rows, right)];
  if (report.stripe === 'not_configured') {
    lines.push('Stripe totals not compared: set STRIPE_SECRET_KEY and STRIPE_METER_ID_* to compare.');
  }
  const errors = report.organizations.filter((o) => o.stripe?.error);
  for (const o of errors) lines.push(`Stripe error for ${o.organizationId}: ${o.stripe?.error}`);
  lines.push(
    report.hasDrift
      ? `DRIFT FOUND in ${report.organizations.filter((o) => o.hasDrift).length} organization(s) (marked !)`
      : 'no drift',
  );
  return lines.join('\n');
}

export async function reconcileCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const parsed = reconcileQuery.safeParse({
    from: str(values, 'from'),
    to: str(values, 'to'),
    organizationId: str(values, 'organization'),
  });
  if (!parsed.success) return usageError(io, zodMessage(parsed.error), RECONCILE_USAGE);
  const bar = createProgressBar(io.err, 'reconciling organizations');
  const report = await reconcile(ctx, parsed.data, {
    organizationId: parsed.data.organizationId,
    // Stripe's own totals are compared whenever the meter ids are configured (one call per
    // organization and meter, hence the progress bar); --skip-stripe keeps it to the database.
    withStripe: values['skip-stripe'] !== true,
    onProgress: (done, total) => bar.update(done, total),
  });
  bar.finish();
  io.out(values.json ? JSON.stringify(report, null, 2) : formatReconciliation(report));
  // Exit 1 on drift so cron jobs and CI alert on it.
  return report.hasDrift ? 1 : 0;
}

export const adminCommands: Record<string, CliCommand> = {
  'outbox list': {
    summary: 'list outbox rows (filters, cursor pagination)',
    usage: LIST_USAGE,
    options: flags(['status', 'organization', 'meter', 'from', 'to', 'limit', 'cursor'], ['json']),
    run: (ctx, { values }) => outboxListCommand(ctx, values),
  },
  'outbox retry': {
    summary:
      'put failed outbox rows back to pending and queue their delivery (groups past the identifier window: refused, or reconciled first with --reconcile)',
    usage: RETRY_USAGE,
    options: flags(['id', 'organization', 'meter'], ['all', 'reconcile', 'json']),
    run: (ctx, { values }) => outboxRetryCommand(ctx, values),
  },
  reconcile: {
    summary: 'readings stored vs usage delivered per organization; exit 1 on drift',
    usage: RECONCILE_USAGE,
    options: flags(['from', 'to', 'organization'], ['skip-stripe', 'json']),
    run: (ctx, { values }) => reconcileCommand(ctx, values),
  },
};
