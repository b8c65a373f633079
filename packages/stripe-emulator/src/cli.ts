// npm run stripe:emulator — runs the local Stripe emulator, or with `webhook <type>` builds, signs and
// posts one Stripe-shaped event to a webhook endpoint and prints the answer.
import { parseArgs } from 'node:util';
import { cliTools, FAULT_FLAGS, faultFlags, runCli, stopOnSignal } from '@meterbox/emulator-kit';
import {
  DEFAULT_PORT,
  DEMO_CUSTOMER_ID,
  DEV_WEBHOOK_SECRET,
  exampleEvent,
  type FaultsInput,
  faultsSchema,
  type SubscriptionStatus,
  sendWebhook,
  startStripeEmulator,
  WEBHOOK_TYPES,
  type WebhookType,
} from './index.js';

const USAGE = `usage:
  stripe-emulator [--port 12111] [--host 127.0.0.1] [--sandbox] [--rate N] [--stream-rate N]
                  [--strict-customers] [--persist state.json] [--seed N] [--verbose]
                  [--no-meters]   (start as an account without meters, as a new Stripe account is)
                  [--error-rate P] [--rate-limit-rate P] [--reset-rate P] [--timeout-rate P]
                  [--accepted-then-500-rate P] [--accepted-then-reset-rate P]
                  [--latency-ms MS] [--jitter-ms MS] [--hang-ms MS]
  stripe-emulator webhook <type> [--url URL] [--secret whsec_...] [--customer cus_..] [--subscription sub_..]
      defaults: npm start's API (http://127.0.0.1:3000/webhooks/stripe), its webhook secret
      (whsec_meterbox_dev) and its demo customer (${DEMO_CUSTOMER_ID})
                  [--organization UUID] [--status active] [--meter mtr_..]
  webhook types: ${WEBHOOK_TYPES.join(', ')}`;

const cli = cliTools('stripe-emulator', USAGE);
const { fail, num } = cli;

async function webhook(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      url: { type: 'string' },
      secret: { type: 'string' },
      customer: { type: 'string' },
      subscription: { type: 'string' },
      organization: { type: 'string' },
      status: { type: 'string' },
      meter: { type: 'string' },
    },
  });
  const type = positionals[0];
  if (!type || !(WEBHOOK_TYPES as readonly string[]).includes(type))
    fail(`unknown webhook type ${type ?? '(none)'}`);
  // Defaults: the API of `npm start`, its dev webhook secret and its demo customer.
  const url = values.url ?? `http://127.0.0.1:${process.env.PORT ?? 3000}/webhooks/stripe`;
  const secret = values.secret ?? process.env.STRIPE_WEBHOOK_SECRET ?? DEV_WEBHOOK_SECRET;
  const event = exampleEvent(type as WebhookType, {
    customer: values.customer,
    subscription: values.subscription,
    organizationId: values.organization,
    status: values.status as SubscriptionStatus | undefined,
    meter: values.meter,
  });
  const response = await sendWebhook(url, event, secret);
  console.log(
    JSON.stringify({ sent: event, response: { status: response.status, body: response.body } }, null, 2),
  );
  process.exit(response.status >= 200 && response.status < 300 ? 0 : 1);
}

async function serveEmulator(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      port: { type: 'string' },
      host: { type: 'string' },
      sandbox: { type: 'boolean' },
      rate: { type: 'string' },
      'stream-rate': { type: 'string' },
      'strict-customers': { type: 'boolean' },
      persist: { type: 'string' },
      seed: { type: 'string' },
      verbose: { type: 'boolean' },
      'no-meters': { type: 'boolean' },
      ...FAULT_FLAGS,
    },
  });
  const faultInput: FaultsInput = faultFlags(values, cli);
  const faults = faultsSchema.safeParse(faultInput);
  if (!faults.success) fail(faults.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; '));

  const emulator = await startStripeEmulator({
    port: num('port', values.port) ?? DEFAULT_PORT,
    host: values.host ?? '127.0.0.1',
    sandbox: values.sandbox ?? false,
    ratePerSecond: num('rate', values.rate),
    streamRatePerSecond: num('stream-rate', values['stream-rate']),
    strictCustomers: values['strict-customers'] ?? false,
    persistPath: values.persist,
    ...(values['no-meters'] ? { meters: [] } : {}),
    seed: num('seed', values.seed),
    faults: faults.data,
    onLog: values.verbose ? (entry) => console.error(JSON.stringify(entry)) : undefined,
  });
  console.log(
    `stripe emulator listening on ${emulator.url} (STRIPE_API_BASE=${emulator.url}; control: ${emulator.url}/_emulator/state)`,
  );
  stopOnSignal(emulator, { stopped: 'stripe emulator stopped', failed: 'stripe emulator: shutdown failed' });
}

const [first, ...rest] = process.argv.slice(2);
await runCli('stripe-emulator', async () => {
  if (first === 'webhook') await webhook(rest);
  else if (first === 'help' || first === '--help' || first === '-h') console.log(USAGE);
  else await serveEmulator(first === 'serve' ? rest : process.argv.slice(2));
});
