// Global set-up of the cluster suite (vitest project `citus`): a Citus coordinator and two workers on
// this machine (test/support/citus.ts), meterbox's migrations on the coordinator, then
// `meterbox citus distribute`'s function. The files share that one distributed database, one after
// the other. Without a Citus build the project is skipped, loudly, except in CI, where it fails.
import type { TestProject } from 'vitest/node';
import { CITUS_INSTALL, citusInstalled, migrateAndDistribute, startCitusCluster } from './citus.js';
import { testSeed } from './random.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** The meterbox database on the coordinator, migrated and distributed; '' when Citus is absent. */
    citusUrl: string;
    /** The same database on each worker (to look at shards). */
    citusWorkerUrls: string[];
  }
}

export default async function setup(project: TestProject): Promise<(() => Promise<void>) | undefined> {
  process.env.MB_TEST_SEED ??= String(testSeed());
  if (!citusInstalled()) {
    const message = `Citus is not installed on this machine: the cluster suite (test/citus) is SKIPPED. Install ${CITUS_INSTALL}.`;
    if (process.env.CI) throw new Error(`${message} (CI runs the build script first: .ci/run)`);
    console.warn(`\n${'!'.repeat(100)}\n[meterbox tests] ${message}\n${'!'.repeat(100)}\n`);
    project.provide('citusUrl', '');
    project.provide('citusWorkerUrls', []);
    return undefined;
  }
  const started = Date.now();
  const cluster = await startCitusCluster(2);
  try {
    const url = cluster.coordinator.url;
    await migrateAndDistribute(url);
    console.log(
      `[meterbox tests] Citus cluster: coordinator 127.0.0.1:${cluster.coordinator.port}, workers ${cluster.workers
        .map((w) => `127.0.0.1:${w.port}`)
        .join(
          ', ',
        )}; migrated and distributed in ${Date.now() - started} ms; seed ${process.env.MB_TEST_SEED}`,
    );
    project.provide('citusUrl', url);
    project.provide(
      'citusWorkerUrls',
      cluster.workers.map((w) => w.url),
    );
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return () => cluster.stop();
}
