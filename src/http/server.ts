// Starts the Hono app on a Node HTTP listener; stop() stops accepting and waits for in-flight requests.
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type { Hono } from 'hono';
import type { AppEnv } from './types.js';

const KEEP_ALIVE_TIMEOUT_MS = 65_000;

export interface HttpServer {
  url: string;
  port: number;
  stop(deadlineMs: number): Promise<void>;
}

export function startHttpServer(
  app: Hono<AppEnv>,
  options: { port: number; host: string },
): Promise<HttpServer> {
  return new Promise((resolve, reject) => {
    const server = serve(
      { fetch: app.fetch, port: options.port, hostname: options.host },
      (info: AddressInfo) => {
        const host = info.address.includes(':') ? `[${info.address}]` : info.address;
        let stopping: Promise<void> | undefined;
        resolve({
          url: `http://${host}:${info.port}`,
          port: info.port,
          stop(deadlineMs) {
            stopping ??= new Promise<void>((done) => {
              const force = setTimeout(() => {
                if ('closeAllConnections' in server) server.closeAllConnections();
                done();
              }, deadlineMs);
              force.unref();
              server.close(() => {
                clearTimeout(force);
                done();
              });
              if ('closeIdleConnections' in server) server.closeIdleConnections();
            });
            return stopping;
          },
        });
      },
    );
    server.once('error', reject);
    // Node closes idle keep-alive connections after 5 s; a client (or load balancer) that reuses one
    // at that instant gets a reset instead of an answer. Keep them longer than common client and
    // proxy idle timeouts (60 s), and let headers wait a little longer still, as Node requires.
    if ('keepAliveTimeout' in server) {
      server.keepAliveTimeout = KEEP_ALIVE_TIMEOUT_MS;
      server.headersTimeout = KEEP_ALIVE_TIMEOUT_MS + 1_000;
    }
  });
}
