// Connections that die without a word, for tests: a TCP proxy in front of Postgres that, on command,
// stops forwarding on every connection open at that instant (both ways) without closing any of them,
// while connections opened later pass. Two ways to drop: `proxy` (the proxy swallows the bytes; the
// kernels see a live peer, so only meterbox's own deadlines and heartbeats can notice) and `iptables`
// (a chain of the test's own drops every packet of those connections on lo, so the kernel's keepalive
// sees it too; root only, the chain removed by close()).
import { execFileSync } from 'node:child_process';
import { createServer, type Server, type Socket, connect as tcpConnect } from 'node:net';

export type DropMode = 'proxy' | 'iptables';

export interface BlackholeProxy {
  readonly port: number;
  /** `url` (a postgres:// URL) with its host and port replaced by this proxy's. */
  through(url: string): string;
  /** Connections accepted so far. */
  readonly accepted: number;
  /** Connections open now and not black-holed (a black-holed one may never hear its close). */
  readonly open: number;
  /** Drops every connection open now, silently; returns how many. New connections still pass. */
  blackhole(): number;
  close(): Promise<void>;
}

/** Why the iptables mode cannot run here, or undefined when it can (root and a working iptables). */
export function iptablesUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not running as root';
  try {
    execFileSync('iptables', ['-w', '-L', 'INPUT', '-n'], { stdio: 'ignore' });
    return undefined;
  } catch (err) {
    return `iptables does not work here (${err instanceof Error ? err.message : String(err)})`;
  }
}

interface Pair {
  client: Socket;
  upstream: Socket;
  /** Black-holed (by either mode). */
  blackholed: boolean;
  /** The proxy swallows its bytes (proxy mode). */
  dropped: boolean;
}

export async function startBlackholeProxy(upstreamPort: number, mode: DropMode): Promise<BlackholeProxy> {
  const pairs = new Set<Pair>();
  let accepted = 0;
  // One chain per proxy, jumped to from INPUT for lo only; rules match the client side's port.
  const chain = `MBX-BLACKHOLE-${process.pid}-${upstreamPort}`.slice(0, 28);
  let chainMade = false;
  const iptables = (...args: string[]) => execFileSync('iptables', ['-w', ...args], { stdio: 'pipe' });

  const server: Server = createServer((client) => {
    accepted++;
    const upstream = tcpConnect(upstreamPort, '127.0.0.1');
    const pair: Pair = { client, upstream, blackholed: false, dropped: false };
    pairs.add(pair);
    for (const s of [client, upstream]) s.on('error', () => undefined);
    // Forwarded by hand (not pipe): a dropped pair swallows what arrives, in both directions.
    client.on('data', (chunk) => {
      if (!pair.dropped) upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (!pair.dropped) client.write(chunk);
    });
    const done = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('close', done);
    upstream.on('close', done);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;

  return {
    port,
    through(url) {
      const u = new URL(url);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    get accepted() {
      return accepted;
    },
    get open() {
      return [...pairs].filter((p) => !p.blackholed).length;
    },
    blackhole() {
      const now = [...pairs].filter((p) => !p.blackholed);
      if (mode === 'iptables') {
        if (!chainMade) {
          iptables('-N', chain);
          iptables('-I', 'INPUT', '-i', 'lo', '-j', chain);
          chainMade = true;
        }
        // The client's end of each connection: every packet to or from that port on lo is dropped.
        for (const p of now) {
          const clientPort = String(p.client.remotePort);
          iptables('-A', chain, '-p', 'tcp', '--sport', clientPort, '--dport', String(port), '-j', 'DROP');
          iptables('-A', chain, '-p', 'tcp', '--sport', String(port), '--dport', clientPort, '-j', 'DROP');
        }
      }
      // With iptables the proxy keeps forwarding: the packets are lost on the wire, as in production.
      for (const p of now) {
        p.blackholed = true;
        if (mode === 'proxy') p.dropped = true;
      }
      return now.length;
    },
    async close() {
      if (chainMade) {
        iptables('-D', 'INPUT', '-i', 'lo', '-j', chain);
        iptables('-F', chain);
        iptables('-X', chain);
        chainMade = false;
      }
      for (const p of pairs) {
        p.client.destroy();
        p.upstream.destroy();
      }
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
