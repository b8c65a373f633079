// An emulator's HTTP listener: the Hono app served on a host and port (0: a free one), its base URL,
// and a stop that wakes every injected delay, lets idle connections go and ends the rest after a
// second, safe to call twice.
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type { FaultRuntime } from './fault-answers.js';
import type { App } from './http.js';

export interface Listening {
  /** The base URL (an IPv6 address in brackets). */
  url: string;
  port: number;
}

/**
 * Serves `app` until `stop()`: `beforeClose` runs once stop() began and the delays were woken (an
 * emulator's own timers), `afterClose` once the server closed (a last save).
 */
export async function listen(
  app: App,
  rt: Pick<FaultRuntime, 'wakers'> & { markStopped(): void },
  options: {
    host?: string;
    port?: number;
    beforeClose?: () => void;
    afterClose?: () => Promise<void>;
  },
): Promise<Listening & { stop(): Promise<void> }> {
  const server = await new Promise<ReturnType<typeof serve>>((resolve, reject) => {
    const s = serve(
      { fetch: app.fetch, port: options.port ?? 0, hostname: options.host ?? '127.0.0.1' },
      () => resolve(s),
    );
    s.once('error', reject);
  });
  const address = server.address() as AddressInfo;
  const url = `http://${address.address.includes(':') ? `[${address.address}]` : address.address}:${address.port}`;
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      rt.markStopped();
      options.beforeClose?.();
      for (const wake of [...rt.wakers]) wake();
      await new Promise<void>((done) => {
        server.close(() => done());
        if ('closeIdleConnections' in server) server.closeIdleConnections();
        const force = setTimeout(() => {
          if ('closeAllConnections' in server) server.closeAllConnections();
        }, 1000);
        force.unref();
      });
      await options.afterClose?.();
    })();
    return stopping;
  };
  return { url, port: address.port, stop };
}
