// npm start — all-in-one development mode: API + worker in one process; an embedded Postgres (data
// in DEV_DATA_DIR, kept across restarts) when DATABASE_URL is unset; the local Stripe emulator when
// STRIPE_SECRET_KEY is unset; the local Metronome emulator when METRONOME_BEARER_TOKEN is unset; a demo
// organization whose API key, destinations and a curl example are printed.
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { type MetronomeEmulator, startMetronomeEmulator } from '@meterbox/metronome-emulator';
import {
  DEFAULT_PORT,
  DEMO_CUSTOMER_ID,
  DEV_WEBHOOK_SECRET,
  type StripeEmulator,
  startStripeEmulator,
} from '@meterbox/stripe-emulator';
import pg from 'pg';
import { ensureDemoOrganization } from '../admin/demo.js';
import { listIntervals, prepareDestination } from '../admin/destinations.js';
import { createApp } from '../api/app.js';
import { setupStripeAccount } from '../billing/stripe-account.js';
import { directDatabaseUrl, loadConfig } from '../config.js';
import { createContext, createStripeClient } from '../context.js';
import { type EmbeddedDatabase, startEmbeddedPostgres } from '../db/embedded.js';
import { startHttpServer } from '../http/server.js';
import { createLogger, readableDestination } from '../log.js';
import { ensureBillableMetrics } from '../metering/metronome.js';
import { migrate } from '../migrations.js';
import { startWorker } from '../worker/start.js';
import { configOrExit, exitOnFatal, onShutdownSignal } from './process.js';

const DEV_DATABASE = 'meterbox';
const base = configOrExit({ needDatabase: false });
// Readable lines for a person at a terminal; the production entry points log JSON.
const log = createLogger(base.LOG_LEVEL, { mode: 'dev' }, readableDestination());
const releases: (() => Promise<void>)[] = [];
let shuttingDown = false;

async function releaseAll(): Promise<void> {
  // Reverse order of acquisition: HTTP, worker, context, emulator, Postgres.
  for (const release of releases.reverse()) {
    await release().catch((err: unknown) => log.warn({ err }, 'shutdown step failed'));
  }
  releases.length = 0;
}

async function createDatabaseIfMissing(embedded: EmbeddedDatabase): Promise<void> {
  const client = new pg.Client({ connectionString: embedded.adminUrl });
  await client.connect();
  try {
    const { rowCount } = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [DEV_DATABASE]);
    if (!rowCount) await client.query(`CREATE DATABASE ${DEV_DATABASE}`);
  } finally {
    await client.end();
  }
}

/** What dev mode keeps across restarts (never committed: the data directory is git-ignored). */
interface DevSecrets {
  adminToken: string;
  demoApiKey?: string;
}

async function readSecrets(file: string): Promise<DevSecrets> {
  if (existsSync(file)) {
    const saved = JSON.parse(await readFile(file, 'utf8')) as Partial<DevSecrets>;
    if (typeof saved.adminToken === 'string' && saved.adminToken.length >= 16) return saved as DevSecrets;
  }
  return { adminToken: `dev-${randomBytes(12).toString('hex')}` };
}

async function saveSecrets(file: string, secrets: DevSecrets): Promise<void> {
  await writeFile(file, `${JSON.stringify(secrets, null, 2)}\n`, { mode: 0o600 });
}

async function startEmulator(dataDir: string): Promise<StripeEmulator> {
  const options = { persistPath: join(dataDir, 'stripe-emulator.json') };
  try {
    return await startStripeEmulator({ ...options, port: DEFAULT_PORT });
  } catch {
    return startStripeEmulator({ ...options, port: 0 }); // 12111 taken: any free port
  }
}

/** The Metronome emulator's usual port (its CLI's default), or any free one. */
async function startMetronome(): Promise<MetronomeEmulator> {
  try {
    return await startMetronomeEmulator({ port: 12112 });
  } catch {
    return startMetronomeEmulator({ port: 0 });
  }
}

onShutdownSignal(async () => {
  shuttingDown = true;
  log.info('stopping');
  await releaseAll();
}, base.SHUTDOWN_TIMEOUT_MS + 15_000);

try {
  const dataDir = resolve(base.DEV_DATA_DIR);
  await mkdir(dataDir, { recursive: true });
  const secretsFile = join(dataDir, 'dev-secrets.json');
  const secrets = await readSecrets(secretsFile);
  const env: Record<string, string | undefined> = { ...process.env };

  let postgresDir: string | undefined;
  if (!base.DATABASE_URL) {
    const embedded = await startEmbeddedPostgres({ dataDir: join(dataDir, 'postgres') });
    releases.push(() => embedded.stop());
    await createDatabaseIfMissing(embedded);
    env.DATABASE_URL = embedded.urlFor(DEV_DATABASE);
    log.info({ dataDir: embedded.dataDir, postgresPid: embedded.pid }, 'embedded Postgres started');
    postgresDir = embedded.dataDir;
  }

  let emulator: StripeEmulator | undefined;
  if (!base.STRIPE_SECRET_KEY) {
    emulator = await startEmulator(dataDir);
    const running = emulator;
    releases.push(() => running.stop());
    env.STRIPE_SECRET_KEY = 'sk_test_meterbox_dev';
    env.STRIPE_API_BASE = emulator.url;
    env.STRIPE_WEBHOOK_SECRET ??= DEV_WEBHOOK_SECRET;
    // The same setup an operator runs on a real account (`meterbox stripe setup`): finds the
    // emulator's meters, or creates (reactivates) them when its saved state lacks them.
    const setup = await setupStripeAccount(createStripeClient(loadConfig(env))!);
    for (const { spec, meter } of setup.meters) env[spec.idVariable] ??= meter.id;
    log.info({ url: emulator.url }, 'Stripe emulator started');
  }
  // The Metronome emulator keeps nothing across restarts: its billable metrics and the demo's customer
  // are set up anew at every start (as `meterbox metronome setup` would).
  let metronome: MetronomeEmulator | undefined;
  if (!base.METRONOME_BEARER_TOKEN) {
    metronome = await startMetronome();
    const running = metronome;
    releases.push(() => running.stop());
    env.METRONOME_BEARER_TOKEN = 'metronome-dev-token';
    env.METRONOME_API_BASE = metronome.url;
    log.info({ url: metronome.url }, 'Metronome emulator started');
  }
  env.ADMIN_TOKEN ??= secrets.adminToken;

  const config = loadConfig(env);
  await migrate(directDatabaseUrl(config), config, log);
  const ctx = await createContext(config, { log, applicationName: 'meterbox-dev', bossSupervise: true });
  releases.push(() => ctx.close());
  if (metronome && ctx.metronome) await ensureBillableMetrics(ctx.metronome);
  const worker = await startWorker(ctx);
  releases.push(() => worker.stop());
  const server = await startHttpServer(createApp(ctx), {
    port: config.PORT,
    host: config.HOST,
    headersTimeoutMs: config.HTTP_HEADERS_TIMEOUT_MS,
    requestTimeoutMs: config.HTTP_REQUEST_TIMEOUT_MS,
  });
  releases.push(() => server.stop(config.SHUTDOWN_TIMEOUT_MS));

  // The demo customer has a fixed id, the one `npm run stripe:emulator -- webhook` uses by default.
  const demo = emulator
    ? await ensureDemoOrganization(
        ctx,
        async (organizationId) =>
          (
            emulator.customers().find((c) => c.id === DEMO_CUSTOMER_ID) ??
            emulator.createCustomer({
              id: DEMO_CUSTOMER_ID,
              name: 'Demo Cold Chain',
              metadata: { organization_id: organizationId },
            })
          ).id,
        secrets.demoApiKey,
      )
    : undefined;
  await saveSecrets(secretsFile, { ...secrets, ...(demo ? { demoApiKey: demo.apiKey } : {}) });
  // The demo organization can be switched to Metronome: its customer (ingest alias) exists there.
  if (demo && ctx.metronome) await prepareDestination(ctx, demo.organizationId, 'metronome');
  const demoDestinations = demo ? await listIntervals(ctx.db, demo.organizationId) : [];
  const cliEnv = `DATABASE_URL=${config.DATABASE_URL}${metronome ? ` METRONOME_BEARER_TOKEN=${config.METRONOME_BEARER_TOKEN} METRONOME_API_BASE=${metronome.url}` : ''}`;

  const lines = [
    '',
    `meterbox is running at ${server.url}   (Ctrl-C to stop)`,
    `  database         ${base.DATABASE_URL ? 'DATABASE_URL from the environment' : `embedded Postgres, data in ${postgresDir}`}`,
    `  DATABASE_URL     ${config.DATABASE_URL}   (the CLI needs it: DATABASE_URL=… npm run cli -- --help)`,
    `  stripe           ${emulator ? `local emulator at ${emulator.url} (inspect: ${emulator.url}/_emulator/events)` : (config.STRIPE_API_BASE ?? 'api.stripe.com')}`,
    `  metronome        ${metronome ? `local emulator at ${metronome.url} (inspect: ${metronome.url}/_emulator/events)` : (config.METRONOME_API_BASE ?? "Metronome's own API")}`,
    `  admin dashboard  ${server.url}/admin   token: ${config.ADMIN_TOKEN}`,
    `  webhooks         ${server.url}/webhooks/stripe   secret: ${config.STRIPE_WEBHOOK_SECRET ?? '(STRIPE_WEBHOOK_SECRET unset: webhooks off)'}`,
    `  API docs         ${server.url}/docs`,
  ];
  if (demo) {
    lines.push(
      `  demo org         ${demo.organizationId} (customer ${demo.customerId}${demo.created ? ', created now' : ''})`,
      `  demo API key     ${demo.apiKey}`,
      `  demo destination ${demoDestinations
        .map(
          (i) =>
            `${i.destination} (${i.role}${i.from ? ` from ${i.from.toISOString()}` : ''}${i.until ? ` until ${i.until.toISOString()}` : ''})`,
        )
        .join(', ')}`,
      '',
      'Switch the demo organization to Metronome (from the next hour boundary), or run both in parallel:',
      `  ${cliEnv} npm run cli -- destinations set --organization ${demo.organizationId} metronome`,
      `  ${cliEnv} npm run cli -- destinations start-parallel --organization ${demo.organizationId} --to metronome`,
      `  (or the dashboard's Destinations panel; then: npm run cli -- destinations parity --organization ${demo.organizationId})`,
      '',
      'Send a reading:',
      `  curl -s ${server.url}/v1/readings -H 'Authorization: Bearer ${demo.apiKey}' -H 'Content-Type: application/json' \\`,
      `    -d '{"readings":[{"sensorId":"${demo.sensorIds[0]}","recordedAt":"'$(date -u +%Y-%m-%dT%H:%M:%SZ)'","temperatureC":4.2}]}'`,
      'then watch it arrive as a meter event (Stripe) or a usage event (Metronome):',
      `  curl -s ${emulator?.url}/_emulator/events`,
      ...(metronome ? [`  curl -s ${metronome.url}/_emulator/events`] : []),
      '',
      `Stream many readings: npm run simulate -- --url ${server.url} --key ${demo.apiKey}`,
    );
  }
  if (!shuttingDown) console.log(lines.join('\n'));
} catch (err) {
  await releaseAll();
  exitOnFatal(err);
}
