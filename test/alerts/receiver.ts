// A real HTTP receiver for the alert tests: records every request (headers and raw body) and can be
// taken down (connections refused) and brought back on the same port.
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface Received {
  headers: IncomingHttpHeaders;
  body: string;
  eventId: string;
  type: string;
  organizationId: string | null;
}

export interface Receiver {
  url: string;
  received: Received[];
  /** Event ids of every request as it arrived, answered or not. */
  arrivals: string[];
  /** The answer's status (200 by default). */
  status: number;
  /** Holds every answer until release() (a call in flight). */
  hold(): void;
  release(): void;
  down(): Promise<void>;
  up(): Promise<void>;
  close(): Promise<void>;
}

export async function startReceiver(): Promise<Receiver> {
  let server: Server | undefined;
  let port = 0;
  let held: (() => void)[] | undefined;
  const receiver: Receiver = {
    url: '',
    received: [],
    arrivals: [],
    status: 200,
    hold() {
      held = [];
    },
    release() {
      const waiting = held ?? [];
      held = undefined;
      for (const go of waiting) go();
    },
    async down() {
      const s = server;
      server = undefined;
      if (!s) return;
      s.closeAllConnections();
      await new Promise<void>((resolve) => s.close(() => resolve()));
    },
    async up() {
      if (server) return;
      const s = createServer((req, res) => {
        const chunks: Buffer[] = [];
        req.on('data', (c: Buffer) => chunks.push(c));
        req.on('end', () => {
          const body = Buffer.concat(chunks).toString('utf8');
          const parsed = JSON.parse(body) as { id: string; type: string; data: { organization_id?: string } };
          receiver.arrivals.push(parsed.id);
          const answer = () => {
            receiver.received.push({
              headers: req.headers,
              body,
              eventId: parsed.id,
              type: parsed.type,
              organizationId: parsed.data.organization_id ?? null,
            });
            res.statusCode = receiver.status;
            res.end('ok');
          };
          if (held) held.push(answer);
          else answer();
        });
      });
      await new Promise<void>((resolve) => s.listen(port, '127.0.0.1', resolve));
      port = (s.address() as AddressInfo).port;
      receiver.url = `http://127.0.0.1:${port}/hooks`;
      server = s;
    },
    close: () => receiver.down(),
  };
  await receiver.up();
  return receiver;
}
