// The test kit's one free-port finder (dev mode's own: embedded Postgres picks its port the same way; the
// benchmarks import it from there), re-exported so no test writes another; and a process's connections.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

export { freePort } from '../../src/db/embedded.js';

/**
 * TCP connections process `pid` holds open to `port` (Linux: its socket descriptors matched against
 * /proc/net/tcp and tcp6): for instance a process's direct connections to Postgres, which bypass a pooler
 * listening on another port. 0 once the process is gone.
 */
export function connectionsTo(pid: number, port: number): number {
  let inodes: Set<string>;
  try {
    inodes = new Set(
      readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
        try {
          const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
          const m = /^socket:\[(\d+)\]$/.exec(target);
          return m ? [m[1]!] : [];
        } catch {
          return []; // closed meanwhile
        }
      }),
    );
  } catch {
    return 0;
  }
  let count = 0;
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string;
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      // sl local_address rem_address st … inode: an established (01) connection whose remote port is `port`.
      if (fields.length < 10 || fields[3] !== '01') continue;
      const remotePort = Number.parseInt(fields[2]!.split(':').at(-1)!, 16);
      if (remotePort === port && inodes.has(fields[9]!)) count++;
    }
  }
  return count;
}
