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
//
// A statement allowed the long deadline (a claim of a thousand keys, a report's chunk, an ANALYZE) is
// asked after too, at every short deadline until its long one: a server that says its backend is idle
// (the statement never arrived), or that has no such backend on a connection made to it directly (it
// ended the backend of a dead client), gives the connection up then, not a long deadline later. A
// question without an answer, or a backend id a pooler made, waits for the long deadline as before.
import pg from 'pg';

/**
 * What the server says of a connection's backend: 'running' a statement begun since the connection last
 * answered; 'idle' (the backend is there, running nothing of the connection's: the statement never
 * arrived); 'absent' (no backend has that id: the server ended it, or the id is a pooler's);
 * 'unanswered' (the question got no answer within the probe's bound).
 */
export type BackendState = 'running' | 'idle' | 'absent' | 'unanswered';

export interface DeadlineProbe {
  /**
   * Whether backend `pid` is running a statement that began at most `withinMs` ago (the time since its
   * connection last answered). False when the question itself is not answered within the probe's bound.
   */
  running(pid: number, withinMs: number): Promise<boolean>;
  /** What the server says of backend `pid` (see BackendState); asked together with running()'s questions. */
  state(pid: number, withinMs: number): Promise<BackendState>;
  /**
   * Whether a connection to `host`:`port` is to the server the probe asks, directly: then a backend id
   * the server does not know is a backend it ended, never a pooler's.
   */
  asks(host: string | undefined, port: number | undefined): boolean;
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

const RUNNING_SQL = `SELECT pid, CASE WHEN state = 'active'
    THEN (extract(epoch FROM clock_timestamp() - query_start) * 1000)::float8 END AS running_ms
  FROM pg_stat_activity WHERE pid = ANY($1::int[])`;

/**
 * A backend's state from the probe's answer: how long its running statement has run (`null`: it runs
 * none; `undefined`: the server has no such backend), against the time since its connection last answered.
 */
function stateOf(runningMs: number | null | undefined, withinMs: number): BackendState {
  if (runningMs === undefined) return 'absent';
  return runningMs !== null && runningMs <= withinMs + STARTED_SLACK_MS ? 'running' : 'idle';
}

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
  let waiting: { pid: number; withinMs: number; answer: (state: BackendState) => void }[] = [];
  // The server the probe asks, as pg reads the URL (host and port, defaults included).
  const server = new pg.Client({ connectionString: options.connectionString });
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

  /** Each backend of `pids` the server has, with how long its running statement has run (null: none). */
  const ask = async (pids: number[]): Promise<Map<number, number | null>> => {
    let bound: NodeJS.Timeout | undefined;
    try {
      const answer = (async () => {
        const c = await connected();
        return c.query<{ pid: number; running_ms: number | null }>(RUNNING_SQL, [pids]);
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
      const backends = await ask([...new Set(batch.map((q) => q.pid))]).catch(() => undefined);
      for (const q of batch) {
        q.answer(backends === undefined ? 'unanswered' : stateOf(backends.get(q.pid), q.withinMs));
      }
    }
    asking = false;
  };

  const state = (pid: number, withinMs: number) =>
    new Promise<BackendState>((answer) => {
      waiting.push({ pid, withinMs, answer });
      if (!asking) void drain();
    });
  return {
    state,
    async running(pid, withinMs) {
      return (await state(pid, withinMs)) === 'running';
    },
    asks(host, port) {
      return host === server.host && port === server.port;
    },
    close: drop,
  };
}
