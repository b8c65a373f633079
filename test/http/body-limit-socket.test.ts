// A 413 over a real keep-alive socket: the rest of the body is never read, so the answer tells the
// client to close the connection instead of letting it send its next request into a dead socket.
import { request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { expect, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { createTestContext } from '../support/database.js';

// A declared Content-Length is judged from the header alone; a chunked body (no length) is counted as
// it arrives. Both must end in the same 413.
it.each([
  ['with a Content-Length', false],
  ['chunked, without a length', true],
])('answers 413 with Connection: close on a kept-alive socket, body %s', async (_, chunked) => {
  const ctx = await createTestContext({ BODY_LIMIT_BYTES: '2048' });
  const server = serve({ fetch: createApp(ctx).fetch, port: 0, hostname: '127.0.0.1' });
  try {
    await new Promise<void>((resolve) => server.once('listening', () => resolve()));
    const { port } = server.address() as AddressInfo;
    const answer = await new Promise<{ status: number; connection: string | undefined; body: string }>(
      (resolve, reject) => {
        const req = request(
          {
            host: '127.0.0.1',
            port,
            method: 'POST',
            path: '/v1/readings',
            headers: { 'content-type': 'application/json', connection: 'keep-alive' },
          },
          (res) => {
            let body = '';
            res.on('data', (chunk: Buffer) => {
              body += chunk.toString();
            });
            res.on('end', () =>
              resolve({ status: res.statusCode ?? 0, connection: res.headers.connection, body }),
            );
          },
        );
        req.on('error', reject);
        if (chunked) {
          for (let i = 0; i < 10; i++) req.write('x'.repeat(10_000));
          req.end();
        } else req.end('x'.repeat(100_000));
      },
    );
    expect(answer.status).toBe(413);
    expect(answer.connection).toBe('close');
    expect(JSON.parse(answer.body)).toMatchObject({ error: { code: 'payload_too_large' } });
  } finally {
    server.close();
  }
});

// A declared body far over the limit: the client is still uploading when the answer is ready. The
// server reads the rest before answering, so the client gets the 413 instead of a reset (EPIPE).
it('answers 413, not a reset, to a client still uploading tens of megabytes over the limit', async () => {
  const ctx = await createTestContext({ BODY_LIMIT_BYTES: '2048' });
  const server = serve({ fetch: createApp(ctx).fetch, port: 0, hostname: '127.0.0.1' });
  try {
    await new Promise<void>((resolve) => server.once('listening', () => resolve()));
    const { port } = server.address() as AddressInfo;
    const body = Buffer.alloc(48 * 1024 * 1024, 'a');
    for (let attempt = 0; attempt < 3; attempt++) {
      const outcome = await new Promise<string>((resolve) => {
        const req = request(
          {
            host: '127.0.0.1',
            port,
            method: 'POST',
            path: '/v1/readings',
            agent: false,
            headers: { 'content-type': 'application/json', 'content-length': String(body.length) },
          },
          (res) => {
            res.resume();
            res.on('end', () => resolve(String(res.statusCode)));
          },
        );
        req.on('error', (err) => resolve(`transport error: ${err.message}`));
        req.end(body);
      });
      expect(outcome).toBe('413');
    }
  } finally {
    server.close();
  }
});
