// How the process opens a pool: every pool it opens after start-up (delivery's lease connection, the
// worker's Citus node pools) is bounded as the context's own pool is, by one rule written once here:
// the server's bounds in its URL (DB_SERVER_TIMEOUTS), keepalive and the statement deadlines counted
// by the process's connection watch, and the deadline probe asked before a statement is given up.
import type { Logger } from '../log.js';
import { createDatabase, type Database } from './database.js';
import { type ConnectionWatch, serverBoundedUrl } from './dead-connections.js';
import { createDeadlineProbe, type DeadlineProbe } from './deadline-probe.js';

export interface PoolRequest {
  /** The server's URL as configured; its bounds are added here. */
  url: string;
  /** The pool's name in the watch's metric and log lines. */
  pool: string;
  max: number;
  applicationName: string;
  /** How long an idle connection stays open (default 30 s; 0: for good). */
  idleTimeoutMillis?: number;
  /** Statements marked PREPARED go as named statements (DB_PREPARED_STATEMENTS). */
  preparedStatements?: boolean;
  /**
   * Which server the deadline probe asks: 'process' (default), the process's probe of its direct
   * server; 'own', a probe of this URL's server (a Citus node's backends are its own), closed with
   * the pool. A process that probes no deadlines gets no probe either way.
   */
  probe?: 'process' | 'own';
}

export interface OpenedPool extends Database {
  /** Ends the pool and the probe it opened of its own. */
  close(): Promise<void>;
}

export type OpenPool = (request: PoolRequest) => OpenedPool;

export interface PoolBounds {
  DB_SERVER_TIMEOUTS: 'on' | 'off';
  /** Every statement's client-side deadline; 0: none (the CLI's attended commands). */
  DB_STATEMENT_DEADLINE_MS: number;
  DB_LONG_STATEMENT_DEADLINE_MS: number;
}

/**
 * The process's way to open a pool. Without a watch (tests that build delivery by hand), pools have
 * keepalive only and the URL's server bounds, as createDatabase gives without safety.
 */
export function poolOpener(options: {
  bounds: PoolBounds;
  log: Logger;
  watch?: ConnectionWatch;
  /** The process's probe of its direct server; its presence says the process probes deadlines. */
  probe?: DeadlineProbe;
}): OpenPool {
  const { bounds, log, watch } = options;
  return (request) => {
    const connectionString = serverBoundedUrl(request.url, bounds);
    const probe =
      options.probe && request.probe === 'own'
        ? createDeadlineProbe({ connectionString, applicationName: request.applicationName })
        : options.probe;
    const database = createDatabase({
      connectionString,
      max: request.max,
      log,
      applicationName: request.applicationName,
      ...(request.idleTimeoutMillis !== undefined ? { idleTimeoutMillis: request.idleTimeoutMillis } : {}),
      ...(request.preparedStatements ? { preparedStatements: true } : {}),
      ...(watch
        ? {
            safety: {
              deadlineMs: bounds.DB_STATEMENT_DEADLINE_MS,
              longDeadlineMs: bounds.DB_LONG_STATEMENT_DEADLINE_MS,
              watch,
              pool: request.pool,
              ...(probe ? { probe } : {}),
            },
          }
        : {}),
    });
    return {
      ...database,
      close: async () => {
        if (probe !== options.probe) probe?.close();
        await database.pool.end();
      },
    };
  };
}
