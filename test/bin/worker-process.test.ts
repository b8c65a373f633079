import { describe, expect, it } from 'vitest';
import { createTestDatabase } from '../support/database.js';
import { startEntryPoint } from '../support/processes.js';

describe('worker process', () => {
  it('starts pg-boss, then exits 0 on SIGTERM within the shutdown deadline', async () => {
    const url = await createTestDatabase();
    const worker = startEntryPoint('worker', { DATABASE_URL: url, SHUTDOWN_TIMEOUT_MS: '10000' });
    await worker.waitForOutput('worker started');
    const started = Date.now();
    worker.kill('SIGTERM');
    const result = await worker.exited;
    expect(result.code).toBe(0);
    expect(result.stdout).toContain('worker stopped');
    expect(Date.now() - started).toBeLessThan(15_000);
  });

  it('exits 0 on SIGINT too', async () => {
    const url = await createTestDatabase();
    const worker = startEntryPoint('worker', { DATABASE_URL: url });
    await worker.waitForOutput('worker started');
    worker.kill('SIGINT');
    expect((await worker.exited).code).toBe(0);
  });
});

describe('API process', () => {
  it('serves readiness and exits 0 on SIGTERM', async () => {
    const url = await createTestDatabase();
    const api = startEntryPoint('server', { DATABASE_URL: url, PORT: '0' });
    await api.waitForOutput('meterbox API listening');
    const address = /"url":"(http:\/\/[^"]+)"/.exec(api.stdout)?.[1];
    expect(address).toBeDefined();
    const res = await fetch(`${address}/readyz`);
    expect(res.status).toBe(200);
    api.kill('SIGTERM');
    expect((await api.exited).code).toBe(0);
  });
});

describe("the heap: Node's own flags, no HEAP_* settings", () => {
  const heapLimitMb = async (env: Record<string, string>) => {
    const url = await createTestDatabase();
    const api = startEntryPoint('server', { DATABASE_URL: url, PORT: '0', ...env });
    await api.waitForOutput('meterbox API listening');
    const address = /"url":"(http:\/\/[^"]+)"/.exec(api.stdout)?.[1];
    const text = await (await fetch(`${address}/metrics`)).text();
    api.kill('SIGTERM');
    const result = await api.exited;
    expect(result.code).toBe(0);
    const value = /^meterbox_heap_limit_bytes (\d+)/m.exec(text)?.[1];
    expect(value).toBeDefined();
    return { mb: Number(value) / 2 ** 20, stderr: result.stderr };
  };

  it('serves with the heap NODE_OPTIONS sets, and still shuts down on SIGTERM', async () => {
    const { mb } = await heapLimitMb({ NODE_OPTIONS: '--max-old-space-size=200 --max-semi-space-size=4' });
    // old generation + young generation (three semi-spaces)
    expect(mb).toBe(200 + 3 * 4);
  });

  it('a start with HEAP_OLD_SPACE_MB / HEAP_YOUNG_SPACE_MB set says they are gone and what replaces them, and serves', async () => {
    const { mb, stderr } = await heapLimitMb({
      HEAP_OLD_SPACE_MB: '300',
      HEAP_YOUNG_SPACE_MB: '24',
      NODE_OPTIONS: '--max-old-space-size=200 --max-semi-space-size=4',
    });
    expect(stderr).toContain(
      "meterbox: warning: HEAP_OLD_SPACE_MB is no longer read (the heap is sized by Node's flags): use Node's flag --max-old-space-size=300 (command line or NODE_OPTIONS)",
    );
    expect(stderr).toContain(
      "meterbox: warning: HEAP_YOUNG_SPACE_MB is no longer read (the heap is sized by Node's flags): use Node's flag --max-semi-space-size=8 (command line or NODE_OPTIONS)",
    );
    // The retired values change nothing: the flags decide.
    expect(mb).toBe(200 + 3 * 4);
  });

  it('a database that refuses the connection at start-up: exit 1 and one line, no stack', async () => {
    const worker = startEntryPoint('worker', { DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none' });
    const result = await worker.exited;
    expect(result.code).toBe(1);
    expect(result.stderr.trim().split('\n')).toEqual([
      'meterbox: cannot reach the database at 127.0.0.1:1: connection refused (ECONNREFUSED); is Postgres running, and DATABASE_URL right?',
    ]);
  });
});
