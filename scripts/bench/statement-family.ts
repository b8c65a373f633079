// The families the cost bench (cost.ts) sorts the worker's statements into, from their text.
/**
 * A statement's family, from its text (pg_stat_statements normalizes constants, not the SQL's shape).
 * Trimmed: pg_stat_statements stores a statement without its leading white space, pg_stat_activity
 * (the busy sessions' sampler) as sent, and pg-boss's fetch starts with a new line.
 */
export function statementFamily(query: string): string {
  const q = query.replace(/\s+/g, ' ').trim();
  if (/\bleased AS\b/.test(q)) return 'claim';
  if (/\bsettled AS\b/.test(q)) return 'settle';
  if (/\bpgboss\./.test(q)) {
    // pg-boss passes its states as parameters: its statements are told apart by their shape.
    if (/INSERT INTO pgboss\./i.test(q)) return 'pg-boss insert';
    if (/^WITH next AS \( SELECT j\.id FROM pgboss\./i.test(q)) return 'pg-boss fetch';
    if (/SET completed_on/i.test(q)) return 'pg-boss complete';
    if (/SET heartbeat_on = /i.test(q)) return 'pg-boss touch';
    return 'pg-boss other';
  }
  if (/meter_call_budget/.test(q)) return 'budget';
  if (/meter_delivery_keys/.test(q)) return 'leases (renew, reap, release)';
  return 'other';
}

export const FAMILIES = [
  'claim',
  'settle',
  'pg-boss insert',
  'pg-boss fetch',
  'pg-boss complete',
  'pg-boss touch',
  'pg-boss other',
  'budget',
  'leases (renew, reap, release)',
  'other',
] as const;
