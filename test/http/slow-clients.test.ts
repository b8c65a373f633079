// Protocol edges Node handles before Hono, over real sockets: a body trickled a byte at a time and
// headers that never end are cut off after HTTP_REQUEST_TIMEOUT_MS / HTTP_HEADERS_TIMEOUT_MS with a
// 408 in the contract's error shape; oversized headers (431) and a malformed request (400) get the
// same shape; a kept-alive socket idle longer than the headers timeout still serves its next request.
import { connect, type Socket } from 'node:net';
import { Hono } from 'hono';
import { describe, expect, test } from 'vitest';
import { isClientAbort } from '../../src/http/errors.js';
import { type HttpServer, startHttpServer } from '../../src/http/server.js';
import type { AppEnv } from '../../src/http/types.js';

const clientAborts = { count: 0 };

// A server with the production listener's settings (short timeouts) around a two-route app.
const it = test
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  .extend('server', { scope: 'file' }, async ({}, { onCleanup }): Promise<HttpServer> => {
    const app = new Hono<AppEnv>();
    // As the production app's onError does: a request whose client is gone mid-body is no server error
    // (Hono's default handler would print its stack); counted, so the test sees the read was aborted.
    app.onError((err, c) => {
      if (!isClientAbort(err)) throw err;
      clientAborts.count += 1;
      return c.body(null, 400);
    });
    app.post('/echo', async (c) => c.json({ length: (await c.req.text()).length }));
    app.get('/ping', (c) => c.json({ ok: true }));
    const server = await startHttpServer(app, {
      port: 0,
      host: '127.0.0.1',
      headersTimeoutMs: 500,
      requestTimeoutMs: 1_000,
    });
    onCleanup(() => server.stop(1_000));
    return server;
  })
  // Opens a socket, runs `drive` on it, and resolves with everything received until it closes.
  .extend(
    'exchange',
    async ({ server }) =>
      (drive: (socket: Socket) => void) =>
        exchange(server.port, drive),
  );

function exchange(port: number, drive: (socket: Socket) => void): Promise<{ text: string; ms: number }> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const socket = connect(port, '127.0.0.1');
    let text = '';
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('utf8');
    });
    socket.on('close', () => resolve({ text, ms: Date.now() - started }));
    socket.on('error', reject);
    socket.on('connect', () => drive(socket));
  });
}

function parse(raw: string) {
  const [head, body] = raw.split('\r\n\r\n');
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head ?? '')?.[1]);
  return { status, head: (head ?? '').toLowerCase(), body: JSON.parse(body ?? 'null') as unknown };
}

describe('slow and malformed clients', () => {
  it('cuts off a body trickled one byte at a time with a 408 in the contract shape', async ({ exchange }) => {
    let timer: NodeJS.Timeout | undefined;
    const { text, ms } = await exchange((socket) => {
      socket.write(
        'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n',
      );
      timer = setInterval(() => socket.writable && socket.write('x'), 200);
    });
    clearInterval(timer);
    const answer = parse(text);
    expect(answer.status).toBe(408);
    expect(answer.head).toContain('connection: close');
    expect(answer.body).toEqual({
      error: { code: 'request_timeout', message: 'the request was not received in time', details: [] },
    });
    // The handler still reading the body saw its client go: an abort, not a server error.
    await expect.poll(() => clientAborts.count).toBe(1);
    // Node checks every second: well before its 300 s default, and not before the timeout.
    expect(ms).toBeGreaterThanOrEqual(900);
    expect(ms).toBeLessThan(5_000);
  });

  it('cuts off headers that never end', async ({ exchange }) => {
    const { text } = await exchange((socket) => socket.write('GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: '));
    expect(parse(text).status).toBe(408);
  });

  it('answers oversized headers 431 and a malformed request 400, both in the contract shape', async ({
    exchange,
  }) => {
    const big = await exchange((socket) =>
      socket.write(`GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`),
    );
    expect(parse(big.text)).toMatchObject({ status: 431, body: { error: { code: 'headers_too_large' } } });
    const bad = await exchange((socket) => socket.write('NOT A REQUEST\r\n\r\n'));
    expect(parse(bad.text)).toMatchObject({ status: 400, body: { error: { code: 'bad_request' } } });
  });

  it('keeps an idle kept-alive socket usable past the headers timeout', async ({ exchange }) => {
    const { text } = await exchange((socket) => {
      socket.write('GET /ping HTTP/1.1\r\nHost: x\r\n\r\n');
      setTimeout(() => socket.write('GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'), 1_500);
    });
    const answers = text.split('HTTP/1.1 ').filter(Boolean);
    expect(answers.map((a) => a.slice(0, 3))).toEqual(['200', '200']);
  });
});
