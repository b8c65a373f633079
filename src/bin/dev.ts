// npm start — all-in-one development mode: API + worker in one process; an embedded Postgres (data
// in DEV_DATA_DIR, kept across restarts) when DATABASE_URL is unset; the local Stripe emulator when
// STRIPE_SECRET_KEY is unset; the local Metronome emulator when METRONOME_BEARER_TOKEN is unset; a demo
// organization whose API key, destinations and a curl example are printed. The settings the CLI needs
// to reach this instance (database, emulators, their keys) go to <DEV_DATA_DIR>/dev.env.
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
import { serverBoundedUrl } from '../db/dead-connections.js';
import { type EmbeddedDatabase, freePort, portIsFree, startEmbeddedPostgres } from '../db/embedded.js';
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

/**
 * The embedded Postgres's port: DEV_POSTGRES_PORT, the same at every start so the printed DATABASE_URL
 * keeps working; a free one when it is 0 or taken by something else.
 */
async function postgresPort(wanted: number): Promise<number> {
  if (wanted === 0) return freePort();
  if (await portIsFree(wanted)) return wanted;
  log.warn({ port: wanted }, 'DEV_POSTGRES_PORT is taken: the embedded Postgres uses a free port this time');
  return freePort();
}

/** What the CLI needs to reach this instance, as `KEY=value` lines a shell (`set -a; . file`) or Node's --env-file reads. */
async function writeDevEnv(file: string, settings: Record<string, string | undefined>): Promise<void> {
  const lines = [
    '# Written by npm start at every start: the settings the CLI needs to reach this dev instance.',
    '# npm run dev:cli -- <command> reads it; or in a shell: set -a; . <this file>; set +a',
  ];
  for (const [name, value] of Object.entries(settings))
    if (value !== undefined) lines.push(`${name}=${value}`);
  await writeFile(file, `${lines.join('\n')}\n`, { mode: 0o600 });
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
    const embedded = await startEmbeddedPostgres({
      dataDir: join(dataDir, 'postgres'),
      port: await postgresPort(base.DEV_POSTGRES_PORT),
    });
    releases.push(() => embedded.stop());
    await createDatabaseIfMissing(embedded);
    env.DATABASE_URL = embedded.urlFor(DEV_DATABASE);
    log.info({ dataDir: embedded.dataDir, postgresPid: embedded.pid }, 'embedded Postgres started');
    postgresDir = embedded.dataDir;
  }

  // The API's port is needed before it listens: the emulator's webhook endpoint names it.
  if (base.PORT === 0) env.PORT = String(await freePort());
  const apiHost = base.HOST === '0.0.0.0' || base.HOST === '::' ? '127.0.0.1' : base.HOST;
  const webhookUrl = `http://${apiHost}:${env.PORT ?? base.PORT}/webhooks/stripe`;
  let emulator: StripeEmulator | undefined;
  if (!base.STRIPE_SECRET_KEY) {
    emulator = await startEmulator(dataDir);
    const running = emulator;
    releases.push(() => running.stop());
    env.STRIPE_SECRET_KEY = 'sk_test_meterbox_dev';
    env.STRIPE_API_BASE = emulator.url;
    // The same setup an operator runs on a real account (`meterbox stripe setup --webhook-url`): finds
    // the emulator's meters, or creates (reactivates) them when its saved state lacks them, and the
    // webhook endpoint and event destination for this API, so `meterbox stripe check` passes.
    const setup = await setupStripeAccount(createStripeClient(loadConfig(env))!, { webhookUrl });
    for (const { spec, meter } of setup.meters) env[spec.idVariable] ??= meter.id;
    // The webhook secret `npm run stripe:emulator -- webhook` signs with, and the emulator's own
    // endpoint and destination secrets (it signs what it sends there, error reports, with those).
    const emulatorSecrets = [
      ...emulator
        .webhookEndpoints()
        .filter((e) => e.url === webhookUrl)
        .map((e) => e.secret),
      ...emulator
        .eventDestinations()
        .filter((d) => d.url === webhookUrl)
        .map((d) => d.signing_secret),
    ];
    env.STRIPE_WEBHOOK_SECRET ??= [DEV_WEBHOOK_SECRET, ...emulatorSecrets].join(',');
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
  await migrate(serverBoundedUrl(directDatabaseUrl(config), config), config, log);
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

  // The demo customer has a fixed id, the one `npm run stripe:emulator -- webhook` uses by default. With
  // the Metronome emulator, a new demo organization also shadows on Metronome from its first reading.
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
        metronome ? 'metronome' : undefined,
      )
    : undefined;
  await saveSecrets(secretsFile, { ...secrets, ...(demo ? { demoApiKey: demo.apiKey } : {}) });
  // The demo organization can be switched to Metronome: its customer (ingest alias) exists there.
  if (demo && ctx.metronome) await prepareDestination(ctx, demo.organizationId, 'metronome');
  const demoDestinations = demo ? await listIntervals(ctx.db, demo.organizationId) : [];
  const devEnvFile = join(dataDir, 'dev.env');
  await writeDevEnv(devEnvFile, {
    DATABASE_URL: config.DATABASE_URL,
    ...(emulator
      ? {
          STRIPE_SECRET_KEY: config.STRIPE_SECRET_KEY,
          STRIPE_API_BASE: config.STRIPE_API_BASE,
          STRIPE_WEBHOOK_SECRET: DEV_WEBHOOK_SECRET,
          STRIPE_METER_ID_TEMPERATURE_READINGS: config.STRIPE_METER_ID_TEMPERATURE_READINGS,
          STRIPE_METER_ID_ACTIVE_SENSORS: config.STRIPE_METER_ID_ACTIVE_SENSORS,
        }
      : {}),
    ...(metronome
      ? {
          METRONOME_BEARER_TOKEN: config.METRONOME_BEARER_TOKEN,
          METRONOME_API_BASE: config.METRONOME_API_BASE,
        }
      : {}),
    ADMIN_TOKEN: config.ADMIN_TOKEN,
  });
  // `npm run dev:cli` reads .data/dev.env; another data directory is read by the shell first.
  const cli = (args: string) =>
    devEnvFile === resolve('.data', 'dev.env')
      ? `npm run dev:cli -- ${args}`
      : `(set -a; . ${devEnvFile}; set +a; npm run cli -- ${args})`;
  // A fixed usage time, so that the same command sent twice is the same reading (a duplicate).
  const recordedAt = `${new Date().toISOString().slice(0, 19)}Z`;
  const shadowing = demoDestinations.some((i) => i.role === 'shadow' && i.until === null);

  const lines = [
    '',
    `meterbox is running at ${server.url}   (Ctrl-C to stop)`,
    `  database         ${base.DATABASE_URL ? 'DATABASE_URL from the environment' : `embedded Postgres, data in ${postgresDir}`}`,
    `  DATABASE_URL     ${config.DATABASE_URL}`,
    `  CLI              ${cli('--help')}   (settings in ${devEnvFile})`,
    `  stripe           ${emulator ? `local emulator at ${emulator.url} (inspect: ${emulator.url}/_emulator/events)` : (config.STRIPE_API_BASE ?? 'api.stripe.com')}`,
    `  metronome        ${metronome ? `local emulator at ${metronome.url} (inspect: ${metronome.url}/_emulator/events)` : (config.METRONOME_API_BASE ?? "Metronome's own API")}`,
    `  admin dashboard  ${server.url}/admin   token: ${config.ADMIN_TOKEN}`,
    `  webhooks         ${server.url}/webhooks/stripe   secret: ${config.STRIPE_WEBHOOK_SECRET?.split(',')[0] ?? '(STRIPE_WEBHOOK_SECRET unset: webhooks off)'}`,
    `  API docs         ${server.url}/docs`,
  ];
  if (demo) {
    const org = demo.organizationId;
    lines.push(
      `  demo org         ${org} (customer ${demo.customerId}${demo.created ? ', created now' : ''})`,
      `  demo API key     ${demo.apiKey}`,
      `  demo destination ${demoDestinations
        .map(
          (i) =>
            `${i.destination} (${i.role}${i.from ? ` from ${i.from.toISOString()}` : ''}${i.until ? ` until ${i.until.toISOString()}` : ''})`,
        )
        .join(', ')}`,
      '',
      'Send a reading (twice: the second is a duplicate, stored and billed once):',
      `  curl -s ${server.url}/v1/readings -H 'Authorization: Bearer ${demo.apiKey}' -H 'Content-Type: application/json' \\`,
      `    -d '{"readings":[{"sensorId":"${demo.sensorIds[0]}","recordedAt":"${recordedAt}","temperatureC":4.2}]}'`,
      'then watch it arrive as a meter event (Stripe) or a usage event (Metronome):',
      `  curl -s ${emulator?.url}/_emulator/events`,
      ...(metronome ? [`  curl -s ${metronome.url}/_emulator/events`] : []),
      '',
      ...(shadowing
        ? [
            'The demo organization bills to Stripe and shadows on Metronome (a parallel run). Compare them, then move it:',
            `  ${cli(`destinations parity --organization ${org}`)}`,
            `  ${cli(`destinations cut-over --organization ${org}`)}   (Metronome bills from the next hour boundary)`,
          ]
        : [
            'Run the demo organization on Metronome in parallel, or switch it (from the next hour boundary):',
            `  ${cli(`destinations start-parallel --organization ${org} --to metronome`)}`,
            `  ${cli(`destinations set --organization ${org} metronome`)}`,
            `  ${cli(`destinations parity --organization ${org}`)}`,
          ]),
      `  ${cli('stripe check')}`,
      '',
      `Stream many readings: npm run simulate -- --url ${server.url} --key ${demo.apiKey}`,
    );
  }
  if (!shuttingDown) console.log(lines.join('\n'));
} catch (err) {
  await releaseAll();
  exitOnFatal(err);
}
