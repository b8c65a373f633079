// The frozen-worker tests' proxy (test/support/holding-proxy.ts) holds what a frozen worker would read
// late: the answers to its calls in flight, and a close that ends such a call or follows them, in order.
// The close of a connection that owes no answer is not held: a frozen process's kernel receives it while
// the process sleeps, so the worker never wakes to a dead keep-alive connection that looks alive.
import { connect, createServer, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { callTracker, holdingProxy } from '../support/holding-proxy.js';
import { waitFor } from '../support/wait.js';

const REQUEST =
  'POST /v1/billing/meter_events HTTP/1.1\r\nhost: x\r\ncontent-length: 60\r\n\r\n' +
  'payload[stripe_customer_id]=cus_1&identifier=mb_1&value=100000';
const ANSWER = 'HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}';

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const clean of cleanups.splice(0)) clean();
});

/** An upstream that answers every request at once, whose server-side sockets the test can close. */
async function upstream() {
  const sockets: Socket[] = [];
  let received = 0;
  /** Answers each request (false: closes the connection instead, without an answer). */
  let answering = true;
  const server = createServer((socket) => {
    sockets.push(socket);
    socket.on('data', () => {
      received++;
      if (answering) socket.write(ANSWER);
      else socket.end();
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  return {
    url: `http://127.0.0.1:${address.port}`,
    sockets,
    received: () => received,
    closeInsteadOfAnswering: () => {
      answering = false;
    },
  };
}

/** A client connection through the proxy, recording what it reads and when it sees the close. */
async function client(url: string) {
  const { port } = new URL(url);
  const socket = connect(Number(port), '127.0.0.1');
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  const seen: string[] = [];
  socket.on('data', (chunk: Buffer) => seen.push(chunk.toString('latin1')));
  socket.on('end', () => seen.push('<end>'));
  socket.on('error', () => undefined);
  cleanups.push(() => socket.destroy());
  return { socket, seen };
}

describe("the frozen-worker tests' holding proxy", () => {
  it("passes at once the close of an idle connection while it holds a worker's answers", async () => {
    const up = await upstream();
    const proxy = await holdingProxy(up.url, callTracker(), 0);
    cleanups.push(() => proxy.close());
    const c = await client(proxy.url);
    c.socket.write(REQUEST);
    await waitFor('the answer', () => c.seen.join('').includes('{}'), 5_000);

    proxy.hold();
    // The destination lets the idle keep-alive connection go while the worker is frozen.
    up.sockets[0]!.end();
    await waitFor('the close, while held', () => c.seen.includes('<end>'), 5_000);
    proxy.release();
  });

  it('holds an answer and the close that follows it until the release, in order', async () => {
    const up = await upstream();
    const proxy = await holdingProxy(up.url, callTracker(), 0);
    cleanups.push(() => proxy.close());
    const c = await client(proxy.url);

    proxy.hold();
    c.socket.write(REQUEST);
    await waitFor('the call upstream', () => up.received() === 1, 5_000);
    up.sockets[0]!.end();
    // Upstream answered and closed; neither reaches the worker while it is held.
    await new Promise((r) => setTimeout(r, 200));
    expect(c.seen).toEqual([]);

    proxy.release();
    await waitFor('the answer and the close', () => c.seen.includes('<end>'), 5_000);
    expect(c.seen.join('')).toBe(`${ANSWER}<end>`);
  });

  it('holds the close of a connection whose call is in flight: it ends that call', async () => {
    const up = await upstream();
    const proxy = await holdingProxy(up.url, callTracker(), 0);
    cleanups.push(() => proxy.close());
    up.closeInsteadOfAnswering();
    const c = await client(proxy.url);

    proxy.hold();
    c.socket.write(REQUEST);
    await waitFor('the call upstream', () => up.received() === 1, 5_000);
    await new Promise((r) => setTimeout(r, 200));
    expect(c.seen).toEqual([]);

    proxy.release();
    await waitFor('the close', () => c.seen.includes('<end>'), 5_000);
    expect(c.seen).toEqual(['<end>']);
  });

  it('resets a request written after the destination closed the connection, and tracks no call', async () => {
    const up = await upstream();
    const tracker = callTracker();
    const proxy = await holdingProxy(up.url, tracker, 0);
    cleanups.push(() => proxy.close());
    const c = await client(proxy.url);
    let reset: string | undefined;
    c.socket.on('error', (err: Error & { code?: string }) => {
      reset = err.code;
    });
    await waitFor('the upstream connection', () => up.sockets.length === 1, 5_000);
    // The destination closes the idle connection; the worker writes before it reads the close (here it
    // has read it, and keeps its side open to write).
    c.socket.allowHalfOpen = true;
    up.sockets[0]!.destroy();
    await waitFor('the close', () => c.seen.includes('<end>'), 5_000);
    c.socket.write(REQUEST);
    // A socket its peer reset fails its next write.
    await waitFor(
      'the reset',
      () => {
        if (reset === undefined) c.socket.write('\r\n');
        return reset !== undefined;
      },
      5_000,
      50,
    );
    expect(['ECONNRESET', 'EPIPE']).toContain(reset);
    expect(up.received()).toBe(0);
    expect(tracker.identifiers()).toEqual({});
    expect(proxy.awaiting()).toBe(0);
  });
});
