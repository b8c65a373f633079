// `meterbox metronome setup|check` and `meterbox destinations set|start-parallel|cut-over|parity`:
// going live on Metronome and moving an organization between destinations (docs/destinations.md).
import { sql } from 'kysely';
import { judgeBudget, metronomeBudget } from '../billing/limits.js';
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, formatTable, processIo, str, usageError } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { DESTINATIONS, type Destination } from '../db/schema.js';
import {
  ensureBillableMetrics,
  findCustomer,
  listBillableMetrics,
  METRONOME_METRICS,
  metricFor,
  metronomeAlias,
} from '../metering/metronome.js';
import {
  type Change,
  cutOver,
  DestinationChangeError,
  type IntervalView,
  prepareDestination,
  setDestination,
  startParallel,
} from './destinations.js';
import { type ParityReport, parityOf } from './parity.js';
import { type PeriodParityReport, periodParityOf, startPeriodMigration } from './period-migration.js';

type Values = Record<string, string | boolean | undefined>;

const SET_USAGE = 'destinations set --organization <id> stripe|metronome';
const PARALLEL_USAGE =
  'destinations start-parallel --organization <id> --to metronome|stripe [--cut-over hour|period-end]';
const CUT_USAGE = 'destinations cut-over --organization <id>';
const PARITY_USAGE = 'destinations parity --organization <id> [--hours <n> | --period] [--json]';

const isDestination = (v: string | undefined): v is Destination =>
  v !== undefined && (DESTINATIONS as readonly string[]).includes(v);

/** Organizations that bill or shadow to Metronome now or from a coming boundary. */
async function metronomeOrganizations(ctx: Pick<Context, 'db'>): Promise<{ id: string; name: string }[]> {
  const { rows } = await sql<{ id: string; name: string }>`
    SELECT DISTINCT o.id, o.name FROM organizations o JOIN organization_destinations d ON d.organization_id = o.id
     WHERE d.destination = 'metronome' AND d.valid_until IS NULL ORDER BY o.id`.execute(ctx.db);
  return rows;
}

export async function metronomeSetupCommand(ctx: Context, io: CliIo = processIo()): Promise<number> {
  if (!ctx.metronome) {
    io.err.write('meterbox: METRONOME_BEARER_TOKEN is not set; metronome setup needs a token\n');
    return 1;
  }
  for (const m of await ensureBillableMetrics(ctx.metronome)) {
    io.out(`billable metric ${m.eventName}: ${m.id} (${m.created ? 'created' : 'found'})`);
  }
  for (const org of await metronomeOrganizations(ctx)) {
    const customer = await prepareDestination(ctx, org.id, 'metronome');
    io.out(
      `customer of organization ${org.id}: ${customer.metronomeCustomer?.id} alias ${metronomeAlias(org.id)} (${customer.metronomeCustomer?.created ? 'created' : 'found'})`,
    );
  }
  return 0;
}

export async function metronomeCheckCommand(ctx: Context, io: CliIo = processIo()): Promise<number> {
  const lines: { ok: boolean; name: string; detail: string; fix?: string }[] = [];
  if (!ctx.metronome) {
    lines.push({ ok: false, name: 'token', detail: 'METRONOME_BEARER_TOKEN is not set' });
  } else {
    try {
      const metrics = await listBillableMetrics(ctx.metronome);
      lines.push({
        ok: true,
        name: 'API',
        detail: `reachable (${ctx.config.METRONOME_API_BASE ?? "Metronome's own"})`,
      });
      for (const spec of METRONOME_METRICS) {
        const m = metricFor(metrics, spec);
        lines.push({
          ok: m !== undefined,
          name: `billable metric ${spec.eventName}`,
          detail: m
            ? `${m.id} (${spec.aggregation} of value)`
            : `none counts event type ${spec.eventName} with ${spec.aggregation} of value: run meterbox metronome setup`,
        });
      }
      for (const org of await metronomeOrganizations(ctx)) {
        const c = await findCustomer(ctx.metronome, org.id);
        lines.push({
          ok: c !== undefined,
          name: `customer of ${org.id}`,
          detail: c
            ? `${c.id} (alias ${metronomeAlias(org.id)})`
            : `no customer has alias ${metronomeAlias(org.id)}: run meterbox metronome setup`,
        });
      }
    } catch (err) {
      lines.push({ ok: false, name: 'API', detail: err instanceof Error ? err.message : String(err) });
    }
  }
  // The budget in force against Metronome's published ingest limit, and how to raise it.
  lines.push(
    ...judgeBudget(metronomeBudget(ctx.config), {
      calls: 'METRONOME_MAX_CALLS_PER_SECOND',
      events: 'METRONOME_MAX_EVENTS_PER_SECOND',
    }),
  );
  for (const l of lines)
    io.out(`${l.ok ? 'ok  ' : 'FAIL'}  ${l.name}: ${l.detail}${l.ok || !l.fix ? '' : `\n      → ${l.fix}`}`);
  const failed = lines.filter((l) => !l.ok).length;
  io.out(failed === 0 ? 'all checks passed' : `${failed} check(s) failed`);
  return failed === 0 ? 0 : 1;
}

function printIntervals(io: CliIo, intervals: readonly IntervalView[]) {
  io.out(
    formatTable(
      ['destination', 'role', 'from (usage time)', 'until'],
      intervals.map((i) => [
        i.destination,
        i.role,
        i.from ? i.from.toISOString() : 'always',
        i.until ? i.until.toISOString() : '—',
      ]),
    ),
  );
}

function printChange(io: CliIo, change: Change, what: string) {
  if (change.unchanged) io.out(`unchanged: ${what} already`);
  else io.out(`${what} from ${change.at.toISOString()} (usage time; an hour boundary)`);
  printIntervals(io, change.intervals);
}

async function guarded(io: CliIo, run: () => Promise<number>): Promise<number> {
  try {
    return await run();
  } catch (err) {
    // A refusal (the organization already bills there, a parallel run is under way) is not a syntax
    // error: one sentence, no usage line.
    if (err instanceof DestinationChangeError) {
      io.err.write(`meterbox: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}

export async function destinationsSetCommand(
  ctx: Context,
  values: Values,
  positionals: readonly string[],
  io: CliIo = processIo(),
): Promise<number> {
  const org = str(values, 'organization');
  const destination = positionals[0];
  if (!org || !isDestination(destination))
    return usageError(io, 'an organization and a destination', SET_USAGE);
  return guarded(io, async () => {
    await prepareDestination(ctx, org, destination);
    const change = await setDestination(ctx.db, org, destination, { now: ctx.clock.now() });
    printChange(io, change, `${org} bills to ${destination} alone`);
    return 0;
  });
}

export async function destinationsStartParallelCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const org = str(values, 'organization');
  const to = str(values, 'to');
  const cut = str(values, 'cut-over') ?? 'hour';
  if (!org || !isDestination(to) || (cut !== 'hour' && cut !== 'period-end'))
    return usageError(
      io,
      '--organization and --to are required; --cut-over is hour or period-end',
      PARALLEL_USAGE,
    );
  if (cut === 'period-end') return startPeriodParallelCommand(ctx, org, to, io);
  return guarded(io, async () => {
    await prepareDestination(ctx, org, to);
    const change = await startParallel(ctx.db, org, to, { now: ctx.clock.now() });
    printChange(io, change, `${org} also sends its usage to ${to} (shadow)`);
    if (!change.unchanged)
      io.out(
        `watch: meterbox destinations parity --organization ${org} (drift shows per hour as soon as it appears)`,
      );
    return 0;
  });
}

/**
 * `start-parallel --cut-over period-end`: Stripe's runbook. The billing period is read from the
 * organization's Stripe subscription; the parallel run starts at the next hour boundary and the cut-over
 * is stored for the end of the first period it covers whole; the Metronome customer is unbillable until then.
 */
async function startPeriodParallelCommand(
  ctx: Context,
  org: string,
  to: Destination,
  io: CliIo,
): Promise<number> {
  return guarded(io, async () => {
    const { change, period, metronomeCustomer } = await startPeriodMigration(ctx, org, to);
    const p = change.plan;
    io.out(
      change.unchanged
        ? `unchanged: ${org} is already in a period-boundary parallel run to ${to}`
        : `${org} also sends its usage to ${to} (shadow) from ${p.shadowFrom.toISOString()} (usage time; an hour boundary)`,
    );
    io.out(
      `billing period compared: ${p.periodStart.toISOString()} → ${p.periodEnd.toISOString()} (Stripe subscription ${period.subscriptionId})`,
    );
    io.out(
      `cut-over at ${p.cutOverAt.toISOString()}${p.aligned ? ' (the period end)' : " (the hour boundary before the period end: Stripe's period does not end on an hour)"}: usage before it bills ${change.from}, usage from it bills ${to}`,
    );
    io.out(
      `Metronome customer ${metronomeCustomer.id} (${metronomeCustomer.created ? 'created' : 'found'}): unbillable now, billable from ${p.cutOverAt.toISOString()}`,
    );
    printIntervals(io, change.intervals);
    io.out(`watch: meterbox destinations parity --organization ${org} --period`);
    return 0;
  });
}

export async function destinationsCutOverCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const org = str(values, 'organization');
  if (!org) return usageError(io, '--organization is required', CUT_USAGE);
  return guarded(io, async () => {
    const cut = await cutOver(ctx.db, org, { now: ctx.clock.now() });
    io.out(`cut-over at ${cut.at.toISOString()}`);
    io.out(`usage before it bills ${cut.from}; usage from it bills ${cut.to}; none both, none neither`);
    printIntervals(io, cut.intervals);
    return 0;
  });
}

export function formatParity(report: ParityReport): string {
  return formatTable(
    ['hour (UTC)', 'destination', 'role', 'stored − voided', 'delivered', 'destination says', 'drift'],
    report.rows.map((r) => [
      r.hour.toISOString().slice(0, 13),
      r.destination,
      r.role,
      String(r.expected),
      String(r.delivered),
      r.reported === null ? '?' : String(r.reported),
      r.drift === null ? '?' : r.drift === 0 ? 'exact' : String(r.drift),
    ]),
    new Set([3, 4, 5]),
  );
}

/**
 * The table (hours with usage somewhere) and one line that names what the rows show: exact, drift (a
 * number in the drift column) or unknown (`?`: the destination could not be asked, and why).
 */
export function paritySummary(report: ParityReport, hours: number): { text: string; exact: boolean } {
  const rows = report.rows.filter(
    (r) => r.expected !== 0 || r.delivered !== 0 || (r.reported !== null && r.reported !== 0),
  );
  const drifting = report.rows.filter((r) => r.drift !== null && r.drift !== 0).length;
  const unknown = [...new Set(rows.filter((r) => r.reported === null).map((r) => r.destination))];
  const notes: string[] = [];
  if (drifting > 0)
    notes.push(`drift in ${drifting} row(s): see the drift column (a pending row lands, or reconcile)`);
  if (unknown.length > 0)
    notes.push(
      `${unknown.join(' and ')} could not be asked (the rows marked ?): ${unknown
        .map((d) =>
          d === 'stripe'
            ? 'Stripe needs STRIPE_SECRET_KEY, a temperature_readings meter and the customer linked'
            : 'Metronome needs METRONOME_BEARER_TOKEN and its temperature_readings billable metric',
        )
        .join('; ')}`,
    );
  const table = rows.length > 0 ? formatParity({ ...report, rows }) : `no usage in the last ${hours} hour(s)`;
  return {
    text: `${table}\n${notes.length === 0 ? 'every destination exact' : notes.join('\n')}`,
    exact: notes.length === 0,
  };
}

export async function destinationsParityCommand(
  ctx: Context,
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const org = str(values, 'organization');
  if (org && values.period) {
    return guarded(io, async () => {
      const report = await periodParityOf(ctx, org);
      if (values.json) io.out(JSON.stringify(report, null, 2));
      else io.out(formatPeriodParity(report));
      return report.exact ? 0 : 1;
    });
  }
  const hours = Number(str(values, 'hours') ?? '24');
  if (!org || !Number.isInteger(hours) || hours < 1 || hours > 24 * 35)
    return usageError(io, '--organization is required; --hours is 1 to 840', PARITY_USAGE);
  const now = ctx.clock.now();
  const to = new Date(Math.ceil(now.getTime() / 3_600_000) * 3_600_000);
  const report = await parityOf(ctx, org, { from: new Date(to.getTime() - hours * 3_600_000), to });
  if (values.json) {
    io.out(JSON.stringify(report, null, 2));
    return report.exact ? 0 : 1;
  }
  const summary = paritySummary(report, hours);
  io.out(summary.text);
  return summary.exact ? 0 : 1;
}

/** The per-period report: usage per destination and invoice totals, and one line on the compared totals. */
export function formatPeriodParity(report: PeriodParityReport): string {
  const m = report.migration;
  const num = (n: number | null) => (n === null ? '?' : String(n));
  const table = formatTable(
    [
      'period',
      'kind',
      'destination',
      'role',
      'stored − voided',
      'destination says',
      'drift',
      'invoice total',
      'invoice',
    ],
    report.rows.map((r) => [
      `${r.periodStart.toISOString().slice(0, 16)} → ${r.periodEnd.toISOString().slice(0, 16)}`,
      r.kind,
      r.destination,
      r.role,
      String(r.expected),
      num(r.reported),
      r.drift === null ? '?' : r.drift === 0 ? 'exact' : String(r.drift),
      num(r.invoiceTotal),
      [r.invoiceStatus, r.billable].filter((x) => x !== null).join(' ') || '—',
    ]),
    new Set([4, 5, 7]),
  );
  const t = report.totals;
  const line =
    t.agree === null
      ? `compared period ${m.periodStart.toISOString()} → ${m.periodEnd.toISOString()}: invoice totals not both known (Stripe ${num(t.stripe)}, Metronome ${num(t.metronome)}); usage above`
      : t.agree
        ? `compared period: invoice totals agree (${t.stripe} on both)`
        : `compared period: invoice totals differ: Stripe ${t.stripe}, Metronome ${t.metronome}`;
  return `cut-over ${m.from} → ${m.to} at ${m.cutOverAt.toISOString()} (shadow from ${m.shadowFrom.toISOString()})\n${table}\n${line}\n${report.exact ? 'every period exact' : 'not exact: see the drift column and the totals'}`;
}

export const destinationCommands: Record<string, CliCommand> = {
  'metronome setup': {
    summary: "find or create Metronome's billable metrics and the customers (ingest aliases) meterbox needs",
    usage: 'metronome setup',
    options: flags([]),
    run: (ctx) => metronomeSetupCommand(ctx),
  },
  'metronome check': {
    summary: 'check the Metronome account without changing anything (exit 0 or 1)',
    usage: 'metronome check',
    options: flags([]),
    run: (ctx) => metronomeCheckCommand(ctx),
  },
  'destinations set': {
    summary: 'bill an organization to one destination alone, from the next hour boundary',
    usage: SET_USAGE,
    options: flags(['organization']),
    run: (ctx, { values, positionals }) => destinationsSetCommand(ctx, values, positionals),
  },
  'destinations start-parallel': {
    summary:
      "also send an organization's usage to a second destination (shadow), from the next hour boundary; --cut-over period-end also schedules the cut-over at the Stripe billing period's end",
    usage: PARALLEL_USAGE,
    options: flags(['organization', 'to', 'cut-over']),
    run: (ctx, { values }) => destinationsStartParallelCommand(ctx, values),
  },
  'destinations cut-over': {
    summary: 'make the shadow destination the billing one at the hour boundary this prints',
    usage: CUT_USAGE,
    options: flags(['organization']),
    run: (ctx, { values }) => destinationsCutOverCommand(ctx, values),
  },
  'destinations parity': {
    summary: 'per hour: stored − voided against each destination’s own usage (exit 0 exact, 1 drift)',
    usage: PARITY_USAGE,
    options: flags(['organization', 'hours'], ['json', 'period']),
    run: (ctx, { values }) => destinationsParityCommand(ctx, values),
  },
};
