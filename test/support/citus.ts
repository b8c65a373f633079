// The cluster suite's Citus cluster: the benchmarks start the same one (scripts/lib/citus.ts).
export * from '../../scripts/lib/citus.js';

import { citusQuery } from '../../scripts/lib/citus.js';
import { waitFor } from './wait.js';

/** Waits until every outbox row of `orgs` is delivered, counted through the coordinator at `url`. */
export async function untilDeliveredOnCluster(
  url: string,
  orgs: readonly { organizationId: string }[],
  what = 'every outbox row delivered',
): Promise<void> {
  await waitFor(
    what,
    async () =>
      Number(
        (
          await citusQuery<{ n: string }>(
            url,
            `SELECT count(*)::text AS n FROM meter_outbox WHERE status <> 'delivered' AND organization_id = ANY($1::uuid[])`,
            [orgs.map((o) => o.organizationId)],
          )
        )[0]?.n,
      ) === 0,
    120_000,
    500,
  );
}
