// The ratio bench's lean HTTP client (scripts/bench/lean-http.ts) against a real node:http server: what
// it sends is what node:http's client sends (method, path, headers, body), it reads answers with a
// Content-Length and chunked ones, keeps its connections alive and never opens more than it may, and a
// connection that dies gives a status of -1, never a hang.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { LeanHttpClient } from '../../scripts/bench/lean-http.js';

const closers: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const close of closers.splice(0)) await close();
});

async function server(handle: (req: IncomingMessage, body: string, res: ServerResponse) => void) {
  let connections = 0;
  const s = createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => {
      body += c;
    });
    req.on('end', () => handle(req, body, res));
  });
  s.on('connection', () => connections++);
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  closers.push(async () => {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  });
  return { url: `http://127.0.0.1:${(s.address() as AddressInfo).port}`, connections: () => connections };
}

describe("the ratio bench's lean HTTP client", () => {
  it('sends the request node:http would and reads a Content-Length answer', async () => {
    const seen: { method?: string; url?: string; headers?: IncomingMessage['headers']; body?: string }[] = [];
    const s = await server((req, body, res) => {
      seen.push({ method: req.method, url: req.url, headers: req.headers, body });
      res.writeHead(201, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ inserted: 1, duplicates: 0 }));
    });
    const client = new LeanHttpClient(s.url, 4);
    const body = JSON.stringify({ readings: [{ temperatureC: 21.5, note: 'é' }] });
    const r = await client.postJson('/v1/readings', body, 'mb_key', { 'idempotency-key': 'k1' });
    client.close();
    expect(r.status).toBe(201);
    expect(JSON.parse(r.body)).toEqual({ inserted: 1, duplicates: 0 });
    expect(seen).toEqual([
      {
        method: 'POST',
        url: '/v1/readings',
        headers: expect.objectContaining({
          authorization: 'Bearer mb_key',
          'content-type': 'application/json',
          'content-length': String(Buffer.byteLength(body)),
          'idempotency-key': 'k1',
        }),
        body,
      },
    ]);
  });

  it('reads chunked answers, keeps its connections alive and opens at most maxSockets', async () => {
    const s = await server((_req, body, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      // Two writes without a length: node:http sends them chunked.
      res.write(`echo:`);
      setTimeout(() => res.end(body), 5);
    });
    const client = new LeanHttpClient(s.url, 3);
    const answers = await Promise.all(
      Array.from({ length: 30 }, (_, i) => client.postJson('/x', `n${i}`, 'k')),
    );
    client.close();
    expect(answers.map((a) => a.status)).toEqual(Array.from({ length: 30 }, () => 200));
    expect(answers.map((a) => a.body)).toEqual(Array.from({ length: 30 }, (_, i) => `echo:n${i}`));
    expect(s.connections()).toBe(3);
  });

  it('opens a new connection after an answer that closes its own, and gives -1 for a connection that dies', async () => {
    let n = 0;
    const s = await server((_req, _body, res) => {
      n++;
      if (n === 2) {
        res.socket?.destroy();
        return;
      }
      res.writeHead(200, { connection: 'close', 'content-length': '2' });
      res.end('ok');
    });
    const client = new LeanHttpClient(s.url, 1);
    const first = await client.postJson('/x', '', 'k');
    const second = await client.postJson('/x', '', 'k');
    const third = await client.postJson('/x', '', 'k');
    client.close();
    expect([first.status, first.body]).toEqual([200, 'ok']);
    expect(second.status).toBe(-1);
    expect([third.status, third.body]).toEqual([200, 'ok']);
    expect(s.connections()).toBe(3);
  });
});
