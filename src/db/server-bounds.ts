// What each connection asks Postgres for at its start-up so that the server finds a dead client on its
// own side (DB_SERVER_TIMEOUTS, withServerBounds in dead-connections.ts), and what that bounds: how long
// a dead worker's statement can still run, and so commit. No imports: the simulation's model of a
// crash reads the same bound (scripts/sim/world.ts).

/** The server's side of a dead client: probes after this long idle (s), this far apart (s), this many. */
export const SERVER_KEEPALIVE = { idle: 5, interval: 1, count: 5 } as const;
/** The server gives up on data the client has not acknowledged after this long (ms). */
export const SERVER_USER_TIMEOUT_MS = 10_000;
/**
 * How often a backend running a statement checks that its client is still connected (PostgreSQL 14's
 * client_connection_check_interval, ms). A client that gave up on a statement (its deadline) destroys
 * the connection, but without this check the server runs the statement to its end: on a database held
 * to a quarter of a core, claims the workers had abandoned at their 45 s deadline ran on for up to 181 s,
 * taking the CPU the retried claims needed (docs/benchmarks.md, "A slow database with a backlog").
 */
export const SERVER_CLIENT_CHECK_MS = 1_000;
/** An idle-in-transaction bound shorter than this would end transactions over a GC pause. */
export const MIN_IDLE_IN_TRANSACTION_MS = 5_000;
/**
 * The longest the server still runs a statement after its client died, with these settings: a killed
 * process's kernel closes its sockets and the connection check stops the statement within a check
 * interval; a host gone silent is found by keepalive (idle, then every probe unanswered) first. A
 * statement that has not committed by then is rolled back and its row locks freed, so a worker killed
 * in the middle of a slow claim never leases its keys long after its death (simulation seed 3454).
 */
export const SERVER_STOPS_DEAD_CLIENT_MS =
  (SERVER_KEEPALIVE.idle + SERVER_KEEPALIVE.interval * SERVER_KEEPALIVE.count) * 1000 +
  SERVER_CLIENT_CHECK_MS;
