// Frozen workers (SIGSTOP longer than the lease, then SIGCONT) under load, against real Postgres and
// the Stripe emulator: each worker is frozen in turn while it holds leases with calls in flight, then
// both at once (nobody reaps or resends meanwhile, so they wake to expired leases of pending rows). The
// lease runs out, the reaper and the other worker take its keys over, and the frozen worker wakes to
// calls that time out: each worker reaches the emulator through its own proxy, which holds the answers
// to a frozen worker until a second after it wakes, as when the freeze lands between the request and
// the read of its answer (the emulator has recorded the event). Those stale answers change nothing (the
// settle refuses them); the keys' next owner resends the same identifiers. With a retry limit of 0 a
// stale timeout applied would fail rows Stripe billed: the ledger must be exact, each reading billed
// once, never two calls in flight for one customer and meter, and the ledger level within seconds of
// the load's end.
//
// And a worker frozen in the middle of the hourly report's meter-delivery-batch job: the job stays
// `active` (it covers nothing for the sweep), so the sweep queues the keys it has not reached yet as
// jobs of their own and the other worker bills them during the freeze; the reaper frees the frozen
// slice's keys once their lease lapses; the worker wakes to finish a job whose keys are gone or taken.
// Each organization billed once, with its count.
import { connect, createServer, type Server } from 'node:net';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import { ensureQueues } from '../../src/metering/queues.js';
import {
  activeSensorEventsByCustomer,
  activeSensorRows,
  batchJobKeyCounts,
  bulkActiveSensors,
  createBulkOrganizations,
} from '../metering/active-sensors-fixtures.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import { stripeTest } from '../support/test.js';
import {
  driveLoad,
  FAST_DELIVERY_ENV,
  loadFailures,
  loadOrganizations,
  outboxSettled,
  serverErrors,
  startApi,
  startWorkerProcess,
} from '../support/topology.js';
import { waitFor } from '../support/wait.js';

/** The default lease. */
const LEASE_SECONDS = 10;
/** Each freeze: past the lease. */
const FREEZE_MS = 12_000;
/** The ledger must be level this soon after the load ends. */
const LEVEL_BOUND_MS = 15_000;

/** A call sent within this long of its worker's SIGCONT is late: frozen between its lease check and the send. */
const LATE_MS = 100;
/** A call its client gave up on is taken as still in flight until its answer, or this long. */
const ABANDONED_MS = 5_000;

/** One call as the proxies saw it (ms since the tracker began), kept for the report of a failure. */
interface SeenCall {
  proxy: number;
  customer: string;
  identifier: string;
  firstByte: number;
  sent: number;
  ended?: number;
  endedBy?: 'answer' | 'upstream closed';
  /** The answer's status line, as the destination sent it. */
  status?: string;
  late: boolean;
}

/** Calls in flight per customer across both proxies, and every time two overlapped. */
function callTracker() {
  const began = Date.now();
  const inFlight = new Map<string, SeenCall[]>();
  const overlaps: { customer: string; late: boolean }[] = [];
  const history: SeenCall[] = [];
  const notes: string[] = [];
  return {
    overlaps,
    began,
    /** Freezes and wakes, for the report of a failure. */
    note: (what: string) => notes.push(`${Date.now() - began} ${what}`),
    notes,
    /** Every call to `customer`, in the order they were sent. */
    callsTo: (customer: string) => history.filter((c) => c.customer === customer),
    /** Calls seen per identifier. */
    identifiers: () => {
      const seen: Record<string, number> = {};
      for (const c of history) seen[c.identifier] = (seen[c.identifier] ?? 0) + 1;
      return seen;
    },
    start(call: SeenCall) {
      const calls = inFlight.get(call.customer) ?? [];
      if (calls.length > 0)
        overlaps.push({ customer: call.customer, late: call.late || calls.some((c) => c.late) });
      calls.push(call);
      history.push(call);
      inFlight.set(call.customer, calls);
      return (endedBy: NonNullable<SeenCall['endedBy']>) => {
        call.ended = Date.now() - began;
        call.endedBy = endedBy;
        const left = (inFlight.get(call.customer) ?? []).filter((c) => c !== call);
        if (left.length === 0) inFlight.delete(call.customer);
        else inFlight.set(call.customer, left);
      };
    },
  };
}

/** A TCP proxy to `upstream` whose answers (upstream to client) can be held and released in order. */
async function holdingProxy(upstream: string, tracker: ReturnType<typeof callTracker>, index: number) {
  const target = new URL(upstream);
  let holding = false;
  /** When the worker behind it last woke (SIGCONT). */
  let wokeAt = Number.NEGATIVE_INFINITY;
  let held: (() => void)[] = [];
  const sockets = new Set<{ destroy(): void }>();
  /** Connections whose request has gone upstream and whose answer has not come back yet. */
  let awaiting = 0;
  const server: Server = createServer((client) => {
    const up = connect(Number(target.port), target.hostname);
    sockets.add(client);
    sockets.add(up);
    let waiting = false;
    let end: (by: NonNullable<SeenCall['endedBy']>) => void = () => {};
    /** The request so far, until its customer is read (headers and body may come in several chunks). */
    let request = '';
    let tracked = false;
    let firstByte = 0;
    /** The call of the request being read or answered. */
    let current: SeenCall | undefined;
    /** The client gave up on its call (a timeout): the destination may still be working on it. */
    let abandoned = false;
    let abandonTimer: NodeJS.Timeout | undefined;
    const answered = (by: NonNullable<SeenCall['endedBy']>) => {
      if (waiting) awaiting--;
      waiting = false;
      end(by);
      end = () => {};
    };
    const toClient = (act: () => void) => {
      if (abandoned) return;
      if (holding) held.push(act);
      else act();
    };
    client.on('data', (chunk: Buffer) => {
      if (!waiting) {
        awaiting++;
        waiting = true;
        firstByte = Date.now();
        request = '';
        tracked = false;
        current = undefined;
      }
      if (tracked) return;
      // A request's customer may come in a later chunk than its first bytes (a worker frozen or busy
      // between two writes): tracked from the chunk that names it.
      request += chunk.toString('latin1');
      // The Stripe SDK leaves a form key's brackets unencoded (payload[stripe_customer_id]); either form.
      const customer = /stripe_customer_id(?:\]|%5D)=([^&\s]+)/.exec(request)?.[1];
      if (customer) {
        tracked = true;
        const now = Date.now();
        current = {
          proxy: index,
          customer,
          identifier: /[?&\n]identifier=([^&\s]+)/.exec(request)?.[1] ?? '?',
          firstByte: firstByte - tracker.began,
          sent: now - tracker.began,
          // Late: sent right after its worker woke, or begun before a freeze and finished after it.
          late: now - wokeAt < LATE_MS || firstByte < wokeAt,
        };
        end = tracker.start(current);
      }
    });
    client.pipe(up);
    up.on('close', () => {
      clearTimeout(abandonTimer);
      answered('upstream closed');
    });
    up.on('data', (chunk: Buffer) => {
      if (waiting && current) current.status = /^HTTP\/1\.1 (\d+)/.exec(chunk.toString('latin1'))?.[1] ?? '?';
      answered('answer');
      if (abandoned) up.destroy();
      else toClient(() => client.write(chunk));
    });
    up.on('end', () => toClient(() => client.end()));
    up.on('error', () => client.destroy());
    client.on('error', () => undefined);
    // A client that gives up on a call (its timeout) does not stop the destination working on it: the
    // call stays in flight until the destination answers, as Stripe's would (a connection that a
    // request never completed is dropped after ABANDONED_MS).
    client.on('close', () => {
      if (!waiting) return up.destroy();
      abandoned = true;
      abandonTimer = setTimeout(() => up.destroy(), ABANDONED_MS);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('proxy has no port');
  return {
    url: `http://127.0.0.1:${address.port}`,
    awaiting: () => awaiting,
    woke: () => {
      wokeAt = Date.now();
      tracker.note(`worker ${index} woke`);
    },
    hold: () => {
      holding = true;
      tracker.note(`worker ${index} frozen`);
    },
    release: () => {
      holding = false;
      const acts = held;
      held = [];
      for (const act of acts) act();
    },
    close: () => {
      server.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}

const it = stripeTest({
  // Calls take 100-400 ms, so a freeze finds calls (and their leases) in flight.
  emulator: { faults: { latencyMs: 100, jitterMs: 300 } },
  env: {
    ...FAST_DELIVERY_ENV,
    STRIPE_SECRET_KEY: 'sk_test_frozen_workers',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    // Nothing in this world fails a call but a freeze: one counted timeout would fail its rows.
    DELIVERY_RETRY_LIMIT: '0',
  },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('frozen workers', () => {
  it('SIGSTOP past the lease, in turn, under load: exact, one call in flight per key, level within seconds', {
    timeout: 150_000,
  }, async ({ ctx, emulator, startProcess }) => {
    const api = await startApi(startProcess);
    const tracker = callTracker();
    const proxies = await Promise.all([
      holdingProxy(emulator.url, tracker, 0),
      holdingProxy(emulator.url, tracker, 1),
    ]);
    const workers = await Promise.all(
      proxies.map((p) => startWorkerProcess(startProcess, { STRIPE_API_BASE: p.url })),
    );
    const orgs = await loadOrganizations(ctx.db, emulator, 6);

    const loadMs = 3 * FREEZE_MS + 6_000;
    const endAt = Date.now() + loadMs;
    const loading = driveLoad({
      orgs,
      targets: () => [api.url],
      until: () => Date.now() > endAt,
      concurrency: 4,
      readingsPerRequest: 10,
    });

    /** Freezes `which` workers (indexes) once one of them has a call in flight, for FREEZE_MS. */
    const freeze = async (which: readonly number[]) => {
      await waitFor('a call in flight', () => which.some((i) => proxies[i]!.awaiting() > 0), 20_000, 1);
      for (const i of which) proxies[i]!.hold();
      for (const i of which) process.kill(workers[i]!.pid, 'SIGSTOP');
      await new Promise((r) => setTimeout(r, FREEZE_MS));
      for (const i of which) {
        proxies[i]!.woke();
        process.kill(workers[i]!.pid, 'SIGCONT');
      }
      await new Promise((r) => setTimeout(r, 1_000));
      for (const i of which) proxies[i]!.release();
    };
    await new Promise((r) => setTimeout(r, 2_000));
    await freeze([0]);
    await freeze([1]);
    await freeze([0, 1]);

    const load = await loading;
    const loadEnded = Date.now();
    // Not thrown at once: a ledger that never levels (rows failed) is reported below, row by row.
    const level = await waitFor(
      'every outbox row delivered',
      () => outboxSettled(ctx.db),
      2 * LEVEL_BOUND_MS,
    ).then(
      () => Date.now() - loadEnded,
      () => null,
    );

    const ledger = checkLedger({ ...(await loadLedger(ctx.db, orgs)), events: emulator.events() });
    const overlaps = emulator.concurrency().filter((p) => p.max > 1);
    const stale = workers.map((w) => (w.output.match(/stale lease/g) ?? []).length);
    // A call caught by a freeze ends in a timeout, or in a closed connection.
    const timeouts = workers.map((w) => (w.output.match(/"reason":"timeout"/g) ?? []).length);
    const resets = workers.map((w) => (w.output.match(/"reason":"network"/g) ?? []).length);
    console.log(
      `[frozen workers] ${load.requests} requests, ${load.readingsSent} readings; three ${FREEZE_MS} ms freezes ` +
        `(lease ${LEASE_SECONDS} s); overlapping calls ${tracker.overlaps.length}, late ${tracker.overlaps.filter((o) => o.late).length} (emulator peaks > 1: ${overlaps.length}); stale settles refused per worker ${JSON.stringify(stale)}, timed-out calls ${JSON.stringify(timeouts)}, reset ${JSON.stringify(resets)}; level ${level ?? 'never'} ms after the load`,
    );
    // A ledger that is not exact says what the workers said of retries, failures and stale leases.
    const told = workers.flatMap((w, i) =>
      w.output
        .split('\n')
        .filter((line) => /will be retried|dead-lettered|stale lease|could not/.test(line))
        .slice(0, 20)
        .map((line) => `worker ${i}: ${line}`),
    );
    expect(ledger.ok, `${formatReport('frozen workers', ledger)}\n${told.join('\n')}`).toBe(true);
    expect(ledger.readingsStored).toBe(load.readingsSent);
    expect(load.networkErrors, loadFailures(load, [api])).toBe(0);
    expect(serverErrors(load), loadFailures(load, [api])).toBe(0);
    // Never two calls at once for one customer and meter, but for a late call: a worker frozen between
    // its lease check and the send, which nothing can prevent (docs/architecture.md, invariant 8); its
    // identifier keeps it harmless (the ledger above). Every overlap the emulator saw, the proxies saw.
    // The proxies saw every call the emulator counted (a tracker that reads no customer sees no overlap).
    const attempts = emulator.attempts();
    expect(Object.keys(attempts).length).toBeGreaterThan(0);
    const tracked = tracker.identifiers();
    expect(Object.entries(attempts).filter(([identifier, n]) => (tracked[identifier] ?? 0) < n)).toEqual([]);
    // What the proxies and the workers saw of the customers named, for a failure's report.
    const seen = (customers: readonly string[]) =>
      JSON.stringify({
        freezes: tracker.notes,
        customers: customers.map((c) => {
          const calls = tracker.callsTo(c);
          const named = [c, ...calls.map((k) => k.identifier)];
          return {
            customer: c,
            calls,
            logs: workers.map((w, i) =>
              w.output
                .split('\n')
                .filter((line) => named.some((n) => line.includes(n)))
                .map((line) => `worker ${i}: ${line}`),
            ),
          };
        }),
      });
    const notLate = tracker.overlaps.filter((o) => !o.late);
    expect(notLate, seen(notLate.map((o) => o.customer))).toEqual([]);
    expect(tracker.overlaps.length, seen(overlaps.map((o) => o.customer))).toBeGreaterThanOrEqual(
      overlaps.length,
    );
    // The freezes caught calls in flight: they ended (a timeout, a reset) after the lease, and their
    // settles were refused (the stale path).
    expect([...timeouts, ...resets].reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(stale.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(level).not.toBeNull();
    expect(level ?? Number.POSITIVE_INFINITY).toBeLessThan(LEVEL_BOUND_MS);
    expect(workers.every((w) => w.alive)).toBe(true);
    for (const p of proxies) p.close();
  });
});

describe("a worker frozen holding the hourly report's batch job", () => {
  it('SIGSTOP past the lease mid-job: the sweep hands its keys to the other worker, each organization billed once, one call in flight per key', {
    timeout: 150_000,
  }, async ({ ctx, emulator, startProcess }) => {
    // The report is of the current hour: a test this close to its end waits for the next one.
    const toNextHour = utcHourOf(new Date()).getTime() + 3_600_000 - Date.now();
    if (toNextHour < 120_000) await new Promise((resolve) => setTimeout(resolve, toNextHour + 100));
    const tracker = callTracker();
    const proxies = await Promise.all([
      holdingProxy(emulator.url, tracker, 0),
      holdingProxy(emulator.url, tracker, 1),
    ]);
    // 50 calls a second shared: the report's 600 calls take 12 s or more, so a freeze lands mid-job.
    const workers = await Promise.all(
      proxies.map((p) =>
        startWorkerProcess(startProcess, { STRIPE_API_BASE: p.url, STRIPE_MAX_CALLS_PER_SECOND: '50' }),
      ),
    );
    const n = 600;
    await createBulkOrganizations(ctx.db, n);
    for (let i = 1; i <= n; i++) emulator.createCustomer({ id: `cus_bulk_${i}` });
    const hour = utcHourOf(new Date());
    // The hour's report of these organizations, as a worker's chunk hands it off: one batch job of 600 keys.
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));
    const reportKeys = await batchJobKeyCounts(ctx.db);
    expect(reportKeys.reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(n);

    // The worker whose calls are in flight holds the batch job: frozen past its lease.
    await waitFor('a report call in flight', () => proxies.some((p) => p.awaiting() > 0), 20_000, 1);
    const held = proxies.findIndex((p) => p.awaiting() > 0);
    const { rows: active } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery-batch' AND state = 'active'`.execute(
      ctx.db,
    );
    expect(active[0]?.n).toBeGreaterThanOrEqual(1);
    proxies[held]!.hold();
    process.kill(workers[held]!.pid, 'SIGSTOP');
    await new Promise((r) => setTimeout(r, FREEZE_MS));
    // Meanwhile the sweep queued the frozen job's keys (an active batch job covers nothing), and the other
    // worker delivered them on jobs of their own.
    const { rows: swept } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'meter-delivery' AND singleton_key LIKE 'active_sensors:%' AND state = 'completed'`.execute(
      ctx.db,
    );
    expect(swept[0]?.n).toBeGreaterThan(0);
    proxies[held]!.woke();
    process.kill(workers[held]!.pid, 'SIGCONT');
    await new Promise((r) => setTimeout(r, 1_000));
    proxies[held]!.release();

    const rowsOfHour = async () =>
      (await activeSensorRows(ctx.db)).filter((r) => r.occurred_at.getTime() === hour.getTime());
    const level = await waitFor(
      'every report row delivered',
      async () => {
        const rows = await rowsOfHour();
        return rows.length >= n && rows.every((r) => r.status === 'delivered');
      },
      60_000,
    ).then(
      () => true,
      () => false,
    );
    const events = activeSensorEventsByCustomer(emulator, hour);
    const wrong = Array.from({ length: n }, (_, k) => k + 1).filter(
      (i) => JSON.stringify(events.get(`cus_bulk_${i}`)) !== JSON.stringify([bulkActiveSensors(i)]),
    );
    const stale = workers.map((w) => (w.output.match(/stale lease/g) ?? []).length);
    const timeouts = workers.map((w) => (w.output.match(/"reason":"timeout"/g) ?? []).length);
    const resets = workers.map((w) => (w.output.match(/"reason":"network"/g) ?? []).length);
    console.log(
      `[frozen report] ${n} organizations, worker ${held} frozen ${FREEZE_MS} ms holding the batch job; ` +
        `${swept[0]?.n} keys delivered on the sweep's jobs during the freeze; overlapping calls ${tracker.overlaps.length}, ` +
        `late ${tracker.overlaps.filter((o) => o.late).length}; stale settles refused ${JSON.stringify(stale)}, ` +
        `timed-out calls ${JSON.stringify(timeouts)}, reset ${JSON.stringify(resets)}`,
    );
    const seen = (customers: readonly string[]) =>
      JSON.stringify({
        notes: tracker.notes,
        customers: customers
          .slice(0, 5)
          .map((c) => ({ customer: c, events: events.get(c), calls: tracker.callsTo(c) })),
      });
    // Each organization billed once, with its count: no key lost with the frozen job, none sent twice.
    expect(wrong, seen(wrong.map((i) => `cus_bulk_${i}`))).toEqual([]);
    expect(level).toBe(true);
    // Never two calls at once for one customer and meter, but for a late one (see the test above).
    const notLate = tracker.overlaps.filter((o) => !o.late);
    expect(notLate, seen(notLate.map((o) => o.customer))).toEqual([]);
    // The freeze caught calls in flight, whose late answers were refused.
    expect([...timeouts, ...resets].reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(stale.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(workers.every((w) => w.alive)).toBe(true);
    for (const p of proxies) p.close();
  });
});
