// A worker killed (SIGKILL) while its webhook call is in flight: the next worker sends the same event
// again, with the same id, and no event id is ever minted twice for one alert.
import { sql } from 'kysely';
import { afterAll, beforeAll, expect } from 'vitest';
import { webhooksAddCommand } from '../../src/admin/alerts-cli.js';
import { listDeliveries } from '../../src/alerts/delivery.js';
import { createThreshold } from '../../src/alerts/threshold-admin.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { type Receiver, startReceiver } from '../alerts/receiver.js';
import { createOrganization, createSensors, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest({
  env: {
    WEBHOOK_RETRY_DELAY_SECONDS: '1',
    WEBHOOK_RETRY_DELAY_MAX_SECONDS: '1',
    WEBHOOK_TIMEOUT_MS: '3000',
    ALERT_SILENCE_CHECK_SECONDS: '1',
    ALERT_SILENCE_AFTER_MINUTES: '0',
  },
});

let receiver: Receiver;
beforeAll(async () => {
  receiver = await startReceiver();
});
afterAll(async () => {
  await receiver.close();
});

it('sends the same event id again after a worker is killed during the call, and no other', async ({
  ctx,
  startProcess,
}) => {
  await ensureQueues(ctx.boss, ctx.config);
  expect(await webhooksAddCommand(ctx, { url: receiver.url }, memoryIo())).toBe(0);
  const org = await createOrganization(ctx.db);
  const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
  await createThreshold(ctx.db, org.organizationId, { quantity: 5 }, ctx.clock.now());
  receiver.hold();
  await ctx.db.transaction().execute((trx) =>
    storeGroup(
      trx,
      ctx.boss,
      [
        {
          organizationId: org.organizationId,
          readings: Array.from({ length: 10 }, (_, i) => ({
            sensorId: sensor!,
            recordedAt: new Date(Date.now() - 60_000 + i * 1000).toISOString(),
            temperatureC: 4,
          })),
        },
      ],
      ctx.clock.now(),
    ),
  );
  const events = await sql<{
    id: string;
  }>`SELECT id FROM alert_events WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
  expect(events.rows).toHaveLength(1);
  const eventId = events.rows[0]!.id;

  const first = startProcess('worker');
  await waitFor('the call in flight', () => receiver.arrivals.includes(eventId), 90_000);
  first.kill('SIGKILL');
  await first.exited;
  receiver.release();

  const second = startProcess('worker');
  await waitFor(
    'the event delivered by the second worker',
    async () =>
      (await listDeliveries(ctx.db, { organizationId: org.organizationId }))[0]?.status === 'delivered',
    90_000,
  );
  second.kill('SIGTERM');
  await second.exited;
  expect(receiver.arrivals.length).toBeGreaterThanOrEqual(2);
  expect(new Set(receiver.arrivals)).toEqual(new Set([eventId]));
  const [delivery] = await listDeliveries(ctx.db, { organizationId: org.organizationId });
  expect(delivery).toMatchObject({ eventId, status: 'delivered' });
  expect(delivery!.attempts).toBeGreaterThanOrEqual(2);
}, 240_000);
