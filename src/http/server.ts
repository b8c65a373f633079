// Starts the Hono app on a Node HTTP listener; stop() drains (answers what arrives, each answer
// closing its connection), then stops accepting and waits for in-flight requests.
import { type IncomingMessage, type ServerResponse, STATUS_CODES } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { serve } from '@hono/node-server';
import type { Hono } from 'hono';
import type { ErrorCode } from './errors.js';
import type { AppEnv } from './types.js';

const KEEP_ALIVE_TIMEOUT_MS = 65_000;

export interface HttpServer {
  url: string;
  port: number;
  /**
   * Stops the server: for `drain` it keeps answering (every answer with `Connection: close`, so
   * clients drop their kept-alive connections), then stops accepting, closes connections with no
   * request and waits for in-flight requests, closing whatever is left after `deadlineMs`. `drain`
   * is milliseconds (SHUTDOWN_DRAIN_MS), or, for a test that must know what happens during the drain
   * whatever the machine's speed, a promise that ends it (never later than the deadline).
   */
  stop(deadlineMs: number, drain?: number | Promise<unknown>): Promise<void>;
  /** True from the moment stop() is called. */
  readonly draining: boolean;
}

export interface HttpServerOptions {
  port: number;
  host: string;
  /** HTTP_HEADERS_TIMEOUT_MS: longest wait for a request's headers. */
  headersTimeoutMs?: number;
  /** HTTP_REQUEST_TIMEOUT_MS: longest wait for a whole request (headers and body). */
  requestTimeoutMs?: number;
}

export const DEFAULT_HEADERS_TIMEOUT_MS = 10_000;
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;

/** Answers of Node's HTTP parser (before Hono runs), in the contract's error shape. */
function clientErrorAnswer(err: NodeJS.ErrnoException): { status: number; code: ErrorCode; message: string } {
  switch (err.code) {
    case 'HPE_HEADER_OVERFLOW':
      return { status: 431, code: 'headers_too_large', message: 'request headers are too large' };
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return { status: 408, code: 'request_timeout', message: 'the request was not received in time' };
    default:
      return { status: 400, code: 'bad_request', message: 'malformed HTTP request' };
  }
}

/**
 * Node answers parser errors and request timeouts itself (plain text, or nothing) before Hono sees
 * the request; this writes the contract's JSON error instead, with Connection: close since the
 * socket cannot carry another request. As Node does, a socket whose response has started, or that
 * can no longer be written, is only destroyed.
 */
function answerClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  const started = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent;
  if (err.code === 'ECONNRESET' || !socket.writable || started) {
    socket.destroy();
    return;
  }
  const { status, code, message } = clientErrorAnswer(err);
  const body = JSON.stringify({ error: { code, message, details: [] } });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\n` +
      'Content-Type: application/json; charset=UTF-8\r\n' +
      `Content-Length: ${Buffer.byteLength(body)}\r\n` +
      `Connection: close\r\n\r\n${body}`,
  );
}

export function startHttpServer(app: Hono<AppEnv>, options: HttpServerOptions): Promise<HttpServer> {
  const headersTimeout = options.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS;
  const requestTimeout = Math.max(options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS, headersTimeout);
  let draining = false;
  let closed = false;
  let closeIdle = () => {};
  return new Promise((resolve, reject) => {
    const server = serve(
      {
        fetch: app.fetch,
        port: options.port,
        hostname: options.host,
        serverOptions: {
          // A slow client (a body trickled a byte at a time) is cut off after requestTimeout instead
          // of Node's default 300 s; Node checks these timeouts every connectionsCheckingInterval.
          headersTimeout,
          requestTimeout,
          // Node closes idle keep-alive connections after 5 s; a client (or load balancer) reusing one
          // at that instant gets a reset instead of an answer. Keep them longer than common client
          // and proxy idle timeouts (60 s). An idle kept-alive socket is not waiting for headers: the
          // headers timer starts with a request's first byte.
          keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
          connectionsCheckingInterval: Math.min(1_000, headersTimeout),
        },
      },
      (info: AddressInfo) => {
        const host = info.address.includes(':') ? `[${info.address}]` : info.address;
        let stopping: Promise<void> | undefined;
        resolve({
          url: `http://${host}:${info.port}`,
          port: info.port,
          get draining() {
            return draining;
          },
          stop(deadlineMs, drain = 0) {
            draining = true;
            stopping ??= new Promise<void>((done) => {
              const force = setTimeout(() => {
                if ('closeAllConnections' in server) server.closeAllConnections();
                done();
              }, deadlineMs);
              force.unref();
              // Closing a connection that looks idle races a request already on its way over it
              // (sent, not yet read: the client gets a reset for a request it cannot safely resend).
              // The drain reads and answers those first.
              const endDrain = () => {
                if (closed) return;
                closed = true;
                server.close(() => {
                  clearTimeout(force);
                  done();
                });
                closeIdle();
              };
              const drainMs = typeof drain === 'number' ? drain : deadlineMs;
              setTimeout(endDrain, Math.min(drainMs, deadlineMs)).unref();
              if (typeof drain !== 'number') void drain.then(endDrain, endDrain);
            });
            return stopping;
          },
        });
      },
    );
    closeIdle = () => {
      if ('closeIdleConnections' in server) server.closeIdleConnections();
    };
    server.once('error', reject);
    server.on('clientError', answerClientError);
    // Ahead of the app's listener (which may answer synchronously): once draining, every answer
    // closes its connection.
    server.prependListener('request', (_req: IncomingMessage, res: ServerResponse) => {
      if (draining) res.setHeader('Connection', 'close');
      // An answer that began before the drain kept its connection alive; once the listener is
      // closed, that connection would hold the stop until the deadline. Close it when it goes idle.
      else res.once('finish', () => closed && setImmediate(closeIdle));
    });
  });
}
