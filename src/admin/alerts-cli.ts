// `meterbox webhooks …` and `meterbox thresholds …`: alert webhook endpoints, their deliveries, and
// organizations' usage thresholds from the command line (the same functions as the admin API).
import { billingAnchorOf, setBillingAnchor } from '../alerts/billing-anchor.js';
import { listDeliveries, redriveDeliveries, sendTestEvent } from '../alerts/delivery.js';
import { createEndpoint, listEndpoints, removeEndpoint } from '../alerts/endpoints.js';
import { sensorSilenceAlertsOn, setSensorSilenceAlerts } from '../alerts/silence.js';
import {
  createThreshold,
  listThresholds,
  removeThreshold,
  type ThresholdMeter,
} from '../alerts/threshold-admin.js';
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, type FlagValues, formatTable, processIo, str, usageError } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { pgInstant } from '../db/input-types.js';
import { AppError } from '../http/errors.js';

function fail(io: CliIo, err: unknown): number {
  if (err instanceof AppError) {
    const details = err.details.map((d) => `\n  ${d.field ? `${d.field}: ` : ''}${d.message}`).join('');
    io.err.write(`meterbox: ${err.message}${details}\n`);
    return err.status === 404 ? 1 : 2;
  }
  throw err;
}

const ADD_USAGE = 'webhooks add --url <https://…> [--events <type,type|*>] [--description <text>] [--json]';
const REMOVE_USAGE = 'webhooks remove <endpoint-id>';
const TEST_USAGE = 'webhooks test <endpoint-id> [--json]';
const THRESHOLD_ADD_USAGE =
  'thresholds add --organization <id> --quantity <n> [--meter temperature_readings|active_sensors] [--json]';
const THRESHOLD_REMOVE_USAGE = 'thresholds remove --organization <id> <threshold-id>';

export async function webhooksAddCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const url = str(values, 'url');
  if (!url) return usageError(io, '--url is required', ADD_USAGE);
  const events = str(values, 'events')
    ?.split(',')
    .map((e) => e.trim())
    .filter(Boolean);
  try {
    const { endpoint, secret } = await createEndpoint(ctx.db, {
      url,
      ...(events ? { eventTypes: events as ['*'] } : {}),
      ...(str(values, 'description') ? { description: str(values, 'description') } : {}),
    });
    if (values.json) io.out(JSON.stringify({ endpoint, secret }, null, 2));
    else {
      io.out(`endpoint ${endpoint.id} → ${endpoint.url} (${endpoint.eventTypes.join(', ')})`);
      io.out(`secret (shown once; the receiver verifies Meterbox-Signature with it): ${secret}`);
    }
    return 0;
  } catch (err) {
    return fail(io, err);
  }
}

export async function webhooksListCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const endpoints = await listEndpoints(ctx.db);
  if (values.json) {
    io.out(JSON.stringify({ endpoints }, null, 2));
    return 0;
  }
  io.out(
    formatTable(
      ['ID', 'URL', 'EVENTS', 'PENDING', 'DEAD', 'CREATED'],
      endpoints.map((e) => [
        e.id,
        e.url,
        e.eventTypes.join(','),
        String(e.pending),
        String(e.dead),
        e.createdAt.slice(0, 19).replace('T', ' '),
      ]),
      new Set([3, 4]),
    ),
  );
  return 0;
}

export async function webhooksRemoveCommand(ctx: Context, positionals: string[], io: CliIo = processIo()) {
  const id = positionals[0];
  if (!id) return usageError(io, 'the endpoint id is required', REMOVE_USAGE);
  try {
    await removeEndpoint(ctx.db, id);
    io.out(`removed ${id}`);
    return 0;
  } catch (err) {
    return fail(io, err);
  }
}

export async function webhooksTestCommand(
  ctx: Context,
  values: FlagValues,
  positionals: string[],
  io: CliIo = processIo(),
) {
  const id = positionals[0];
  if (!id) return usageError(io, 'the endpoint id is required', TEST_USAGE);
  try {
    const { eventId, attempt } = await sendTestEvent(ctx, id, ctx.clock.now());
    if (values.json) io.out(JSON.stringify({ eventId, attempt }, null, 2));
    else if (attempt?.ok) io.out(`${eventId} delivered to ${id}: HTTP ${attempt.status}`);
    else
      io.out(
        `${eventId} not delivered to ${id}: ${attempt?.error ?? 'another attempt is in flight'} (the worker retries it)`,
      );
    return attempt?.ok ? 0 : 1;
  } catch (err) {
    return fail(io, err);
  }
}

export async function webhooksDeliveriesCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const deliveries = await listDeliveries(ctx.db, {
    ...(str(values, 'endpoint') ? { endpointId: str(values, 'endpoint') } : {}),
    ...(str(values, 'organization') ? { organizationId: str(values, 'organization') } : {}),
    ...(str(values, 'status') ? { status: str(values, 'status') } : {}),
  });
  if (values.json) {
    io.out(JSON.stringify({ deliveries }, null, 2));
    return 0;
  }
  io.out(
    formatTable(
      ['ID', 'EVENT', 'TYPE', 'ENDPOINT', 'STATUS', 'ATTEMPTS', 'LAST', 'CREATED'],
      deliveries.map((d) => [
        d.id,
        d.eventId,
        d.type,
        d.endpointId,
        d.status,
        String(d.attempts),
        d.lastStatus ? `HTTP ${d.lastStatus}` : (d.lastError ?? ''),
        d.createdAt.slice(0, 19).replace('T', ' '),
      ]),
      new Set([0, 5]),
    ),
  );
  return 0;
}

export async function webhooksRedriveCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const endpointId = str(values, 'endpoint');
  const redriven = await redriveDeliveries(ctx.db, ctx.boss, endpointId ? { endpointId } : {});
  io.out(`${redriven} dead deliver${redriven === 1 ? 'y' : 'ies'} back to pending`);
  return 0;
}

export async function thresholdsAddCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const organizationId = str(values, 'organization');
  const quantity = str(values, 'quantity');
  if (!organizationId || !quantity)
    return usageError(io, '--organization and --quantity are required', THRESHOLD_ADD_USAGE);
  try {
    const threshold = await createThreshold(
      ctx.db,
      organizationId,
      {
        quantity: Number(quantity),
        ...(str(values, 'meter') ? { meter: str(values, 'meter') as ThresholdMeter } : {}),
      },
      ctx.clock.now(),
    );
    io.out(
      values.json
        ? JSON.stringify({ threshold }, null, 2)
        : `threshold ${threshold.id}: ${threshold.meter} ≥ ${threshold.quantity} (usage ${threshold.usage} in ${threshold.periodStart} – ${threshold.periodEnd}, ${threshold.state})`,
    );
    return 0;
  } catch (err) {
    return fail(io, err);
  }
}

export async function thresholdsListCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const organizationId = str(values, 'organization');
  if (!organizationId)
    return usageError(io, '--organization is required', 'thresholds list --organization <id>');
  const thresholds = await listThresholds(ctx.db, organizationId, ctx.clock.now());
  if (values.json) {
    io.out(JSON.stringify({ thresholds }, null, 2));
    return 0;
  }
  io.out(
    formatTable(
      ['ID', 'METER', 'QUANTITY', 'USAGE', 'STATE', 'PERIOD START', 'PERIOD END'],
      thresholds.map((t) => [
        t.id,
        t.meter,
        String(t.quantity),
        String(t.usage),
        t.state,
        t.periodStart.slice(0, 19).replace('T', ' '),
        t.periodEnd.slice(0, 19).replace('T', ' '),
      ]),
      new Set([0, 2, 3]),
    ),
  );
  return 0;
}

export async function thresholdsRemoveCommand(
  ctx: Context,
  values: FlagValues,
  positionals: string[],
  io: CliIo = processIo(),
) {
  const organizationId = str(values, 'organization');
  const id = positionals[0];
  if (!organizationId || !id)
    return usageError(io, '--organization and the threshold id are required', THRESHOLD_REMOVE_USAGE);
  try {
    await removeThreshold(ctx.db, organizationId, id);
    io.out(`removed threshold ${id}`);
    return 0;
  } catch (err) {
    return fail(io, err);
  }
}

const PERIOD_USAGE = 'thresholds period --organization <id> [--anchor <instant> | --clear] [--json]';

/**
 * `meterbox thresholds period`: an organization's threshold period now and its billing anchor; with
 * --anchor, sets the anchor (monthly periods from it where Stripe gives none), with --clear, UTC months.
 */
export async function thresholdsPeriodCommand(ctx: Context, values: FlagValues, io: CliIo = processIo()) {
  const organizationId = str(values, 'organization');
  const anchor = str(values, 'anchor');
  if (!organizationId || (anchor !== undefined && values.clear))
    return usageError(
      io,
      '--organization is required, and --anchor and --clear exclude each other',
      PERIOD_USAGE,
    );
  if (anchor !== undefined && !pgInstant('anchor').safeParse(anchor).success)
    return usageError(io, '--anchor must be an ISO-8601 date-time with Z or an offset', PERIOD_USAGE);
  const now = ctx.clock.now();
  try {
    const view =
      anchor !== undefined || values.clear
        ? await setBillingAnchor(ctx.db, organizationId, anchor === undefined ? null : new Date(anchor), now)
        : await billingAnchorOf(ctx.db, organizationId, now);
    io.out(
      values.json
        ? JSON.stringify(view, null, 2)
        : `organization ${organizationId}: period ${view.period.start} – ${view.period.end} (${view.billingAnchorDate ? `monthly from ${view.billingAnchorDate}` : 'UTC months'} where Stripe gives none)`,
    );
    return 0;
  } catch (err) {
    return fail(io, err);
  }
}

const SENSOR_SILENCE_USAGE = 'alerts sensor-silence --organization <id> [on|off]';

/** `meterbox alerts sensor-silence --organization <id> [on|off]`: per-sensor silence alerts (no argument: show). */
export async function sensorSilenceCommand(
  ctx: Context,
  values: FlagValues,
  positionals: string[],
  io: CliIo = processIo(),
) {
  const organizationId = str(values, 'organization');
  const value = positionals[0];
  if (!organizationId || (value !== undefined && value !== 'on' && value !== 'off'))
    return usageError(io, '--organization is required, and the setting is on or off', SENSOR_SILENCE_USAGE);
  if (value !== undefined && !(await setSensorSilenceAlerts(ctx.db, organizationId, value === 'on'))) {
    io.err.write(`meterbox: organization ${organizationId} not found\n`);
    return 1;
  }
  const enabled = await sensorSilenceAlertsOn(ctx.db, organizationId);
  io.out(`per-sensor silence alerts ${enabled ? 'on' : 'off'} for organization ${organizationId}`);
  return 0;
}

export const alertCommands: Record<string, CliCommand> = {
  'alerts sensor-silence': {
    summary: "turn an organization's per-sensor silence alerts on or off (off by default), or show them",
    usage: SENSOR_SILENCE_USAGE,
    options: flags(['organization']),
    run: (ctx, { values, positionals }) => sensorSilenceCommand(ctx, values, positionals),
  },
  'webhooks add': {
    summary: 'add an alert webhook endpoint (prints its signing secret once)',
    usage: ADD_USAGE,
    options: flags(['url', 'events', 'description'], ['json']),
    run: (ctx, { values }) => webhooksAddCommand(ctx, values),
  },
  'webhooks list': {
    summary: 'list alert webhook endpoints with their pending and dead deliveries',
    usage: 'webhooks list [--json]',
    options: flags([], ['json']),
    run: (ctx, { values }) => webhooksListCommand(ctx, values),
  },
  'webhooks remove': {
    summary: 'remove an alert webhook endpoint (its undelivered deliveries are cancelled)',
    usage: REMOVE_USAGE,
    run: (ctx, { positionals }) => webhooksRemoveCommand(ctx, positionals),
  },
  'webhooks test': {
    summary: 'send a signed webhook.test event to an endpoint now (exit 1 when it is not delivered)',
    usage: TEST_USAGE,
    options: flags([], ['json']),
    run: (ctx, { values, positionals }) => webhooksTestCommand(ctx, values, positionals),
  },
  'webhooks deliveries': {
    summary: 'list alert webhook deliveries, newest first, with attempts and last outcome',
    usage:
      'webhooks deliveries [--endpoint <id>] [--organization <id>] [--status pending|delivered|dead|cancelled] [--json]',
    options: flags(['endpoint', 'organization', 'status'], ['json']),
    run: (ctx, { values }) => webhooksDeliveriesCommand(ctx, values),
  },
  'webhooks redrive': {
    summary: 'put dead alert webhook deliveries back to pending (resent in order, same event ids)',
    usage: 'webhooks redrive [--endpoint <id>]',
    options: flags(['endpoint']),
    run: (ctx, { values }) => webhooksRedriveCommand(ctx, values),
  },
  'thresholds add': {
    summary: "add a usage threshold on an organization's current billing period",
    usage: THRESHOLD_ADD_USAGE,
    options: flags(['organization', 'quantity', 'meter'], ['json']),
    run: (ctx, { values }) => thresholdsAddCommand(ctx, values),
  },
  'thresholds list': {
    summary: "list an organization's usage thresholds, their usage and state",
    usage: 'thresholds list --organization <id> [--json]',
    options: flags(['organization'], ['json']),
    run: (ctx, { values }) => thresholdsListCommand(ctx, values),
  },
  'thresholds period': {
    summary:
      "show an organization's threshold period, or set its billing anchor (monthly periods from it where Stripe gives none)",
    usage: PERIOD_USAGE,
    options: flags(['organization', 'anchor'], ['json', 'clear']),
    run: (ctx, { values }) => thresholdsPeriodCommand(ctx, values),
  },
  'thresholds remove': {
    summary: 'remove a usage threshold',
    usage: THRESHOLD_REMOVE_USAGE,
    options: flags(['organization']),
    run: (ctx, { values, positionals }) => thresholdsRemoveCommand(ctx, values, positionals),
  },
};
