// Stopping the HTTP listener (SIGTERM to the API): a request already sent over a kept-alive
// connection when the stop begins is answered, not reset; every answer during the drain closes its
// connection; an in-flight request finishes; once the drain is over, new connections are refused.
// Over real sockets, because the race lives between the client's bytes and Node's idle-connection
// close.
import { connect, type Socket } from 'node:net';
import { Hono } from 'hono';
import { describe, expect, test } from 'vitest';
import { type HttpServer, startHttpServer } from '../../src/http/server.js';
import type { AppEnv } from '../../src/http/types.js';

// biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
const it = test.extend('server', async ({}, { onCleanup }): Promise<HttpServer> => {
  const app = new Hono<AppEnv>();
  app.post('/echo', async (c) => c.json({ length: (await c.req.text()).length }, 201));
  app.get('/slow', async (c) => {
    await new Promise((r) => setTimeout(r, 400));
    return c.json({ ok: true });
  });
  const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
  onCleanup(() => server.stop(1_000));
  return server;
});

const POST = 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello';

/** Blocks the event loop: the bytes just written reach the server's socket before it runs again. */
function busyWait(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    // spin
  }
}

function open(port: number): Promise<{ socket: Socket; received: () => string; closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let text = '';
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('utf8');
    });
    const closed = new Promise<void>((done) => socket.on('close', () => done()));
    socket.once('error', reject);
    socket.once('connect', () => resolve({ socket, received: () => text, closed }));
  });
}

const answers = (raw: string) =>
  [...raw.matchAll(/HTTP\/1\.1 (\d{3})[^\r]*\r\n((?:[^\r]+\r\n)*)\r\n/g)].map((m) => ({
    status: Number(m[1]),
    head: (m[2] ?? '').toLowerCase(),
  }));

async function until(check: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !check(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(check()).toBe(true);
}

describe('stopping the HTTP server', () => {
  it('answers a request sent over a kept-alive connection just before the stop, then closes it', async ({
    server,
  }) => {
    const conn = await open(server.port);
    conn.socket.write(POST);
    await until(() => answers(conn.received()).length === 1);
    expect(answers(conn.received())[0]).toMatchObject({ status: 201 });
    expect(answers(conn.received())[0]?.head).toContain('connection: keep-alive');

    // The second request is on the wire (unread by the server, whose loop is blocked) when the stop
    // begins: the connection looks idle. Closing idle connections at once would reset it.
    conn.socket.write(POST);
    busyWait(30);
    const stopping = server.stop(5_000, 300);
    expect(server.draining).toBe(true);
    await conn.closed;
    const all = answers(conn.received());
    expect(all.map((a) => a.status)).toEqual([201, 201]);
    expect(all[1]?.head).toContain('connection: close');
    await stopping;
  });

  it('finishes an in-flight request, answers new ones during the drain, and refuses connections after it', async ({
    server,
  }) => {
    const slow = fetch(`${server.url}/slow`);
    await new Promise((r) => setTimeout(r, 50));
    const stopping = server.stop(20_000, 200);
    // During the drain the listener still accepts, and the answer closes its connection.
    const during = await fetch(`${server.url}/echo`, { method: 'POST', body: 'abc' });
    expect(during.status).toBe(201);
    expect(during.headers.get('connection')).toBe('close');
    expect((await slow).status).toBe(200);
    // The slow answer kept its connection alive (it began before the drain); the stop closes that
    // connection once it goes idle instead of waiting for the 20 s deadline.
    const waited = performance.now();
    await stopping;
    expect(performance.now() - waited).toBeLessThan(10_000);
    await expect(fetch(`${server.url}/echo`, { method: 'POST', body: 'abc' })).rejects.toThrow();
  });
});
