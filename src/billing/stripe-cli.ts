// `meterbox stripe setup [--webhook-url URL]` and `meterbox stripe check`: set the Stripe account up
// for meterbox, and verify it without writing. Setup prints env lines on stdout (ready for an env
// file) and everything else on stderr; check prints one line per check and exits 0 or 1.

import type Stripe from 'stripe';
import { type CliCommand, flags } from '../cli/command.js';
import { type CliIo, processIo, str, usageError } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { CONNECTED_ACCOUNT } from './connect.js';
import {
  checkConnectedAccounts,
  checkStripeAccount,
  connectedAccountsInUse,
  SetupRefusedError,
  type StripeCheckConfig,
  setupStripeAccount,
} from './stripe-account.js';

type Values = Record<string, string | boolean | undefined>;

const SETUP_USAGE = 'stripe setup [--webhook-url <https://host/webhooks/stripe>] [--account <acct_…>]';

export async function stripeSetupCommand(
  ctx: Pick<Context, 'stripe'> & { db?: Context['db'] },
  values: Values,
  io: CliIo = processIo(),
): Promise<number> {
  const webhookUrl = str(values, 'webhook-url');
  if (webhookUrl !== undefined && !/^https?:\/\/\S+$/.test(webhookUrl))
    return usageError(io, '--webhook-url must be an http(s) URL', SETUP_USAGE);
  const account = str(values, 'account');
  if (account !== undefined && !CONNECTED_ACCOUNT.test(account))
    return usageError(io, '--account must be a connected account id (acct_…)', SETUP_USAGE);
  if (!ctx.stripe) {
    io.err.write('meterbox: STRIPE_SECRET_KEY is not set; stripe setup needs a key (sk_… or rk_…)\n');
    return 1;
  }
  try {
    const result = await setupStripeAccount(ctx.stripe, { webhookUrl });
    for (const { spec, meter, action } of result.meters) {
      io.err.write(`# meter ${spec.eventName}: ${meter.id} (${action})\n`);
      io.out(`${spec.idVariable}=${meter.id}`);
    }
    if (result.webhook) {
      const w = result.webhook;
      io.err.write(
        `# ${w.url}: webhook endpoint ${w.endpointId}${w.destinationId ? `, event destination ${w.destinationId} (thin events)` : ''}\n`,
      );
      if (w.createdSecrets.length > 0) {
        if (w.keptExisting)
          io.err.write(
            '# keep the existing secret too: STRIPE_WEBHOOK_SECRET takes several, comma-separated\n',
          );
        else io.err.write('# the signing secrets are shown only now\n');
        io.out(`STRIPE_WEBHOOK_SECRET=${w.createdSecrets.join(',')}`);
      } else {
        io.err.write('# both already existed: keep your STRIPE_WEBHOOK_SECRET\n');
      }
      if (w.missingEvents.length > 0)
        io.err.write(`# not subscribed: ${w.missingEvents.join(', ')} (add them in the Dashboard)\n`);
    }
    const accounts = new Set(ctx.db ? await connectedAccountsInUse(ctx.db) : []);
    if (account) accounts.add(account);
    return setupConnected(ctx.stripe, [...accounts].sort(), io);
  } catch (err) {
    if (err instanceof SetupRefusedError) {
      io.err.write('meterbox: stripe setup changed nothing; these meters do not fit meterbox:\n');
      for (const problem of err.problems) io.err.write(`  ${problem}\n`);
      io.err.write(
        "  a meter's settings cannot be changed: deactivate it, then run meterbox stripe setup again\n",
      );
      return 1;
    }
    throw err;
  }
}

/**
 * Stripe Connect: the two meters on every connected account with linked customers, and on the one
 * named by --account (before its first customer is linked). Meters are an account's own; their ids
 * are not settings (delivery names meters by event name). An account whose meters do not fit is
 * reported and the others are still set up.
 */
async function setupConnected(stripe: Stripe, accounts: readonly string[], io: CliIo): Promise<number> {
  let failed = 0;
  for (const account of accounts) {
    try {
      const result = await setupStripeAccount(stripe, { account });
      for (const { spec, meter, action } of result.meters)
        io.err.write(`# ${account} meter ${spec.eventName}: ${meter.id} (${action})\n`);
    } catch (err) {
      if (!(err instanceof SetupRefusedError)) throw err;
      failed += 1;
      io.err.write(`meterbox: connected account ${account}: these meters do not fit meterbox:\n`);
      for (const problem of err.problems) io.err.write(`  ${problem}\n`);
    }
  }
  return failed === 0 ? 0 : 1;
}

export async function stripeCheckCommand(
  ctx: Pick<Context, 'stripe'> & { config: StripeCheckConfig; db?: Context['db'] },
  io: CliIo = processIo(),
): Promise<number> {
  const lines = await checkStripeAccount(ctx.stripe, ctx.config);
  if (ctx.stripe && ctx.db && lines.every((l) => l.name !== 'key' || l.ok))
    lines.push(
      ...(await checkConnectedAccounts(ctx.stripe, await connectedAccountsInUse(ctx.db), ctx.config)),
    );
  for (const line of lines) {
    io.out(
      `${line.ok ? 'ok  ' : 'FAIL'}  ${line.name}: ${line.detail}${line.ok || !line.fix ? '' : `\n      → ${line.fix}`}`,
    );
  }
  const failed = lines.filter((l) => !l.ok).length;
  io.out(failed === 0 ? 'all checks passed' : `${failed} check(s) failed`);
  return failed === 0 ? 0 : 1;
}

export const stripeCommands: Record<string, CliCommand> = {
  'stripe setup': {
    summary:
      'find or create the two Stripe meters (and a webhook endpoint), and the meters of every connected account in use; prints env lines',
    usage: SETUP_USAGE,
    options: flags(['webhook-url', 'account']),
    run: (ctx, { values }) => stripeSetupCommand(ctx, values),
  },
  'stripe check': {
    summary: 'check the Stripe account and settings without changing anything (exit 0 or 1)',
    usage: 'stripe check',
    options: flags([]),
    run: (ctx) => stripeCheckCommand(ctx),
  },
};
