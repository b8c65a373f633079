// Which of meterbox's queries Citus runs on one shard and which fan out to every shard, checked with
// EXPLAIN on the cluster (docs/scaling.md lists them). A query of one organization names its
// organization_id and is routed to that organization's shard; the directory lookups that arrive
// without an organization read a reference table; delivery finds a Stripe customer's rows on every
// shard, as do the operator's views over all organizations.
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';

const url = inject('citusUrl');
const ORG = '00000000-0000-4000-8000-000000000001';

/** Shards a statement runs on: Citus's "Task Count", 1 for a router (single-shard) query. */
async function tasks(client: pg.Client, statement: string): Promise<number> {
  const { rows } = await client.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${statement}`);
  const plan = rows.map((r) => r['QUERY PLAN']).join('\n');
  const counts = [...plan.matchAll(/Task Count: (\d+)/g)].map((m) => Number(m[1]));
  if (counts.length === 0) throw new Error(`no Citus task in the plan of ${statement}:\n${plan}`);
  return Math.max(...counts);
}

const SINGLE_SHARD: Record<string, string> = {
  'usage of one organization': `SELECT count(*) FROM temperature_readings
     WHERE organization_id = '${ORG}' AND ingested_at >= now() - interval '1 day' AND voided_at IS NULL`,
  'storing a reading': `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c)
     VALUES (gen_random_uuid(), now(), '${ORG}', 4.2) ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING`,
  "an organization's sensors": `SELECT id, name FROM sensors WHERE organization_id = '${ORG}' ORDER BY id LIMIT 100`,
  "an organization's outbox rows": `SELECT status, sum(value) FROM meter_outbox
     WHERE organization_id = '${ORG}' GROUP BY status`,
  'an API key by its hash (reference table)': `SELECT organization_id FROM api_keys WHERE key_hash = 'x'`,
  'a subscription by Stripe customer (reference table)': `SELECT organization_id FROM subscriptions
     WHERE stripe_customer_id = 'cus_x'`,
  'a webhook event id (reference table)': `SELECT 1 FROM stripe_events WHERE event_id = 'evt_x'`,
};

const FAN_OUT: Record<string, string> = {
  "a Stripe customer's pending rows (delivery)": `SELECT id, value FROM meter_outbox
     WHERE stripe_customer_id = 'cus_x' AND event_name = 'temperature_readings' AND status = 'pending'`,
  'active sensors of every organization (hourly report)': `SELECT organization_id, count(*) FROM sensors
     WHERE active GROUP BY organization_id`,
  'reconciliation over all organizations': `SELECT organization_id, count(*) FROM temperature_readings
     WHERE ingested_at >= now() - interval '1 day' GROUP BY organization_id`,
  'compaction of delivered rows': `SELECT id FROM meter_outbox
     WHERE status = 'delivered' AND delivered_at < now() - interval '7 days' AND kind = 'usage' LIMIT 10000`,
};

describe.skipIf(!url)('query routing on the cluster (EXPLAIN)', () => {
  it.each(Object.entries(SINGLE_SHARD))('runs on one shard: %s', async (_name, statement) => {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      expect(await tasks(client, statement)).toBe(1);
    } finally {
      await client.end();
    }
  });

  it.each(Object.entries(FAN_OUT))('fans out to every shard: %s', async (_name, statement) => {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      // citus.shard_count = 4 in the test cluster (test/support/citus.ts).
      expect(await tasks(client, statement)).toBe(4);
    } finally {
      await client.end();
    }
  });
});
