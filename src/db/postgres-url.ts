// A PostgreSQL connection string read as a URL, for the places that rewrite one (dead-connections.ts's
// server bounds, the Citus nodes' URLs in metering/citus-nodes.ts).

/** `connectionString` as a URL when it is one of PostgreSQL's (postgres: or postgresql:); else undefined. */
export function postgresUrl(connectionString: string): URL | undefined {
  let url: URL;
  try {
    url = new URL(connectionString);
  } catch {
    return undefined;
  }
  return url.protocol === 'postgres:' || url.protocol === 'postgresql:' ? url : undefined;
}
