// What frozen-worker tests watch of the calls to the destination (test/e2e/frozen-workers.test.ts,
// frozen-report.test.ts): one TCP proxy per worker in front of the emulator, which tracks each call by
// customer (two in flight at once for one customer are an overlap, unless one is late: sent right after its
// worker woke, or begun before a freeze and finished after it) and holds a frozen worker's answers until it
// has woken, as when a freeze lands between the request and the read of its answer.
import { connect, createServer, type Server } from 'node:net';
import { ensureQueues } from '../../src/metering/queues.js';
import { stripeTest } from './test.js';
import { FAST_DELIVERY_ENV } from './topology.js';

/** The default lease. */
export const LEASE_SECONDS = 10;
/** Each freeze: past the lease (and past SWEEP_STALE_SECONDS, 2 s in FAST_DELIVERY_ENV). */
export const FREEZE_MS = 12_000;

/** The frozen-worker tests' world: calls of 100-400 ms and a retry limit of 0, queues created. */
export const frozenWorkersTest = stripeTest({
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

/** A call sent within this long of its worker's SIGCONT is late: frozen between its lease check and the send. */
const LATE_MS = 100;
/** A call its client gave up on is taken as still in flight until its answer, or this long. */
const ABANDONED_MS = 5_000;

/** One call as the proxies saw it (ms since the tracker began), kept for the report of a failure. */
export interface SeenCall {
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
export function callTracker() {
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
export async function holdingProxy(upstream: string, tracker: ReturnType<typeof callTracker>, index: number) {
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
    /** This connection's acts among the held ones (its order is kept: a close after its answers). */
    let queued = 0;
    const toClient = (act: () => void) => {
      if (abandoned) return;
      if (holding) {
        queued++;
        held.push(() => {
          queued--;
          act();
        });
      } else act();
    };
    client.on('data', (chunk: Buffer) => {
      // A request written after the destination closed this connection (the worker had not read the
      // close yet) never reaches it: the peer's reset, as a closed socket answers a write. Not a call.
      if (up.destroyed) {
        client.resetAndDestroy();
        return;
      }
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
      // The pipe stopped with it (and paused the client): keep reading, to see a later write.
      client.resume();
    });
    up.on('data', (chunk: Buffer) => {
      if (waiting && current) current.status = /^HTTP\/1\.1 (\d+)/.exec(chunk.toString('latin1'))?.[1] ?? '?';
      answered('answer');
      if (abandoned) up.destroy();
      else toClient(() => client.write(chunk));
    });
    // The destination's close of a connection that owes no answer (idle, as a keep-alive connection
    // the emulator let go while the worker was frozen) reaches the worker at once, as it would reach a
    // frozen process's kernel: held, it would leave the worker a dead connection that looks alive for a
    // second after it wakes, on which its next call waits until the release, losing the time its one
    // resend of a closed connection needs (src/billing/stripe-http.ts). A close that ends a call in
    // flight, or follows held answers, is held in order with them.
    up.on('end', () => {
      if (!waiting && queued === 0) {
        if (!abandoned) client.end();
      } else toClient(() => client.end());
    });
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
