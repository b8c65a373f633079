// The cost bench's statement families (scripts/bench/statement-family.ts) for a statement's text as
// pg_stat_statements stores it and as pg_stat_activity shows it: the busy-session sampler reads the
// latter, where pg-boss's fetch keeps the new line it starts with, and counted it as another pg-boss
// statement.
import { describe, expect, it } from 'vitest';
import { statementFamily } from '../../scripts/bench/statement-family.js';

const FETCH_AS_SENT = `
      WITH
      
      
      next AS (
        SELECT j.id
        FROM pgboss.job_common j
        WHERE j.name = 'meter-delivery'
        LIMIT 1000
        FOR UPDATE OF j SKIP LOCKED
      )
      UPDATE pgboss.job_common j SET state = 'active' FROM next WHERE name = 'meter-delivery' AND j.id = next.id`;

describe('a statement family', () => {
  it("is pg-boss's fetch whether the text starts with white space or not", () => {
    expect(statementFamily(FETCH_AS_SENT)).toBe('pg-boss fetch');
    expect(statementFamily(FETCH_AS_SENT.trim())).toBe('pg-boss fetch');
  });

  it('tells the pipeline statements apart', () => {
    expect(
      statementFamily('WITH input AS (SELECT 1), leased AS (UPDATE meter_delivery_keys SET x = 1)'),
    ).toBe('claim');
    expect(statementFamily('UPDATE pgboss.job SET completed_on = now() WHERE id = ANY($1)')).toBe(
      'pg-boss complete',
    );
    expect(statementFamily('UPDATE meter_call_budget SET tat = $1')).toBe('budget');
  });
});
