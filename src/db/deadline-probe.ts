// A statement that misses its deadline (src/db/dead-connections.ts) ran on a connection that is either
// dead (no answer will ever come: a NAT dropped the flow, a failover moved the address) or alive on a
// slow database (the answer is on its way). The client cannot tell the two apart; the server can. On a
// database held to a quarter of a core the worker's claims, renewals and touches missed their deadlines
// on live connections; destroying them threw the work away, lapsed leases and retried the same claims
// on the CPU they were short of (docs/benchmarks.md, "What holds a slow database back"). So the worker
// asks before it gives up: on a fresh connection, is the backend of that connection still running a
// statement begun since the connection last answered? Yes: it keeps waiting, another deadline, up to a
// bound. No, or no answer to the question in time: it gives up as before.
//
// The question names the backend by the process id Postgres announced at the connection's start. Behind
// a pooler (PgBouncer) that id is the pooler's own, which no server backend has, so there a missed
// deadline gives up as it always did. The statement's age is read on the server's clock against the
// time since the connection last answered on the client's, two durations: no two clocks are compared.
import pg from 'pg';

export interface DeadlineProbe {
  /**
   * Whether backend `pid` is running a statement that began at most `withinMs` ago (the time since its
   * connection last answered). False when the question itself is not answered within the probe's bound.
   */
  running(pid: number, withinMs: number): Promise<boolean>;
  /** Ends the probe's connection (the process is closing). */
  close(): void;
}

/** A statement is kept past its deadline at most this many deadlines in all (from when it was sent). */
export const PROBE_MAX_DEADLINES = 6;

/** The server may begin a statement this long after the client saw the answer before it (one network trip). */
const STARTED_SLACK_MS = 1_000;

/**
 * What one question may take, connecting included; a probe not answered in it counts as "not running".
 * Measured: on a database held to a quarter of a core, 3 s was too short for a new connection's start
 * and first statement (the worker then gave up live connections), so the probe keeps its connection.
 */
const PROBE_TIMEOUT_MS = 5_000;

const RUNNING_SQL = `SELECT pid, (extract(epoch FROM clock_timestamp() - query_start) * 1000)::float8 AS running_ms
  FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND state = 'active'`;

/**
 * A probe that asks `connectionString` (the server itself: the direct URL, not a pooler's) on a
 * connection of its own, made at the first question and kept. Questions asked while one is on its way
 * are asked together in the next one, so a slow database whose statements all miss their deadline at
 * once costs one question.
 */
export function createDeadlineProbe(options: {
  connectionString: string;
  applicationName: string;
  timeoutMs?: number;
}): DeadlineProbe {
  const timeoutMs = options.timeoutMs ?? PROBE_TIMEOUT_MS;
  let waiting: { pid: number; withinMs: number; answer: (yes: boolean) => void }[] = [];
  let asking = false;

  // One connection, kept between questions (a new backend's start is what a starved server is slowest
  // at); dropped after a failed or late question, and made again for the next.
  let client: pg.Client | undefined;
  let connecting: Promise<pg.Client> | undefined;
  const drop = () => {
    const dropped = client;
    client = undefined;
    connecting = undefined;
    if (dropped === undefined) return;
    dropped.end().catch(() => undefined);
    (dropped as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
  };
  const connected = (): Promise<pg.Client> => {
    if (client !== undefined) return Promise.resolve(client);
    connecting ??= (async () => {
      const c = new pg.Client({
        connectionString: options.connectionString,
        application_name: `${options.applicationName}-probe`,
        connectionTimeoutMillis: timeoutMs,
        keepAlive: true,
      });
      // A connection that fails while idle emits 'error': the next question makes a new one.
      c.on('error', () => {
        if (client === c) drop();
      });
      try {
        await c.connect();
      } catch (err) {
        connecting = undefined;
        c.end().catch(() => undefined);
        throw err;
      }
      client = c;
      connecting = undefined;
      return c;
    })();
    return connecting;
  };

  const ask = async (pids: number[]): Promise<Map<number, number>> => {
    let bound: NodeJS.Timeout | undefined;
    try {
      const answer = (async () => {
        const c = await connected();
        return c.query<{ pid: number; running_ms: number }>(RUNNING_SQL, [pids]);
      })();
      const late = new Promise<never>((_, reject) => {
        bound = setTimeout(() => reject(new Error('deadline probe not answered in time')), timeoutMs);
      });
      const { rows } = await Promise.race([answer, late]);
      return new Map(rows.map((r) => [r.pid, r.running_ms]));
    } catch (err) {
      drop();
      throw err;
    } finally {
      clearTimeout(bound);
    }
  };

  const drain = async () => {
    asking = true;
    while (waiting.length > 0) {
      const batch = waiting;
      waiting = [];
      const running = await ask([...new Set(batch.map((q) => q.pid))]).catch(() => undefined);
      for (const q of batch) {
        const ms = running?.get(q.pid);
        q.answer(ms !== undefined && ms <= q.withinMs + STARTED_SLACK_MS);
      }
    }
    asking = false;
  };

  return {
    running(pid, withinMs) {
      return new Promise<boolean>((answer) => {
        waiting.push({ pid, withinMs, answer });
        if (!asking) void drain();
      });
    },
    close: drop,
  };
}
