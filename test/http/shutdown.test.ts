// Stopping the HTTP listener (SIGTERM to the API): a request already sent over a kept-alive
// connection when the stop begins is answered, not reset; every answer during the drain closes its
// connection; an in-flight request finishes; once the drain is over, new connections are refused.
// Over real sockets, because the race lives between the client's bytes and Node's idle-connection
// close. What happens "during the drain" or "while a request is in flight" is held open by gates the
// test opens, not by timers a loaded machine may outrun.
import { connect, type Socket } from 'node:net';
import { Hono } from 'hono';
import { describe, expect, test } from 'vitest';
import { type HttpServer, startHttpServer } from '../../src/http/server.js';
import type { AppEnv } from '../../src/http/types.js';
import { manualGate } from '../support/gates.js';

/** A deadline no test waits for: a stop that needed it would time the test out. */
const NEVER_MS = 600_000;

// /slow is entered (slowEntered opens) and answers once the test opens slowRelease.
let slowEntered = manualGate();
let slowRelease = manualGate();

// biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
const it = test.extend('server', async ({}, { onCleanup }): Promise<HttpServer> => {
  slowEntered = manualGate();
  slowRelease = manualGate();
  const app = new Hono<AppEnv>();
  app.post('/echo', async (c) => c.json({ length: (await c.req.text()).length }, 201));
  app.get('/slow', async (c) => {
    slowEntered.open();
    await slowRelease.opened;
    return c.json({ ok: true });
  });
  const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
  onCleanup(() => {
    slowRelease.open();
    return server.stop(1_000);
  });
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

interface Connection {
  socket: Socket;
  received: () => string;
  closed: Promise<void>;
  /** Resolves once `n` answers have arrived, or the connection closed (whatever had arrived by then). */
  answered: (n: number) => Promise<void>;
}

function open(port: number): Promise<Connection> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let text = '';
    const waiting: { n: number; done: () => void }[] = [];
    const settle = (all: boolean) => {
      for (const w of waiting.splice(0)) {
        if (all || answers(text).length >= w.n) w.done();
        else waiting.push(w);
      }
    };
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('utf8');
      settle(false);
    });
    const closed = new Promise<void>((done) =>
      socket.on('close', () => {
        settle(true);
        done();
      }),
    );
    const answered = (n: number) =>
      new Promise<void>((done) => {
        waiting.push({ n, done });
        settle(socket.destroyed);
      });
    socket.once('error', reject);
    socket.once('connect', () => resolve({ socket, received: () => text, closed, answered }));
  });
}

const answers = (raw: string) =>
  [...raw.matchAll(/HTTP\/1\.1 (\d{3})[^\r]*\r\n((?:[^\r]+\r\n)*)\r\n/g)].map((m) => ({
    status: Number(m[1]),
    head: (m[2] ?? '').toLowerCase(),
  }));

describe('stopping the HTTP server', () => {
  it('answers a request sent over a kept-alive connection just before the stop, then closes it', async ({
    server,
  }) => {
    const conn = await open(server.port);
    conn.socket.write(POST);
    await conn.answered(1);
    expect(answers(conn.received())[0]).toMatchObject({ status: 201 });
    expect(answers(conn.received())[0]?.head).toContain('connection: keep-alive');

    // The second request is on the wire (unread by the server, whose loop is blocked) when the stop
    // begins: the connection looks idle. Closing idle connections at once would reset it. The drain
    // lasts until the test has seen what the connection got (its answer, or its reset).
    conn.socket.write(POST);
    busyWait(30);
    const drain = manualGate();
    const stopping = server.stop(5_000, drain.opened);
    expect(server.draining).toBe(true);
    await conn.answered(2);
    drain.open();
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
    await slowEntered.opened;
    const drain = manualGate();
    const stopping = server.stop(NEVER_MS, drain.opened);
    // During the drain the listener still accepts, and the answer closes its connection.
    const during = await fetch(`${server.url}/echo`, { method: 'POST', body: 'abc' });
    expect(during.status).toBe(201);
    expect(during.headers.get('connection')).toBe('close');
    // The drain ends while /slow is still in flight: from then on new connections are refused.
    drain.open();
    await drain.opened;
    await expect(fetch(`${server.url}/echo`, { method: 'POST', body: 'abc' })).rejects.toThrow();
    slowRelease.open();
    expect((await slow).status).toBe(200);
    // The slow answer kept its connection alive (it began before the drain); the stop closes that
    // connection once it goes idle instead of waiting for the deadline (NEVER_MS: were it waiting, the
    // test would time out here).
    await stopping;
    await expect(fetch(`${server.url}/echo`, { method: 'POST', body: 'abc' })).rejects.toThrow();
  });
});
