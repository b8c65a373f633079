// Per-sensor silence alerts against real Postgres: off unless the organization turns them on (admin
// API); then a sensor that reported within the lookback and has been silent for the configured minutes
// gets one sensor.silent (not again on later passes), and one sensor.resumed when it reports again;
// turning them off ends its silences without events. Organization-level silence is unchanged.
import { sql } from 'kysely';
import { expect } from 'vitest';
import { sensorSilenceCommand } from '../../src/admin/alerts-cli.js';
import { silencePass } from '../../src/alerts/silence.js';
import type { Context } from '../../src/context.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { authHeaders, createOrganization, createSensors, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const ADMIN = 'admin-token-for-sensor-silence-0123456789';
const it = contextTest({
  env: {
    ADMIN_TOKEN: ADMIN,
    ALERT_SILENCE_LOOKBACK_HOURS: '1',
    ALERT_SILENCE_AFTER_MINUTES: '1',
  },
});

/** A reading recorded and stored `secondsAgo` on the database's clock. */
async function readingAgo(ctx: Context, organizationId: string, sensorId: string, secondsAgo: number) {
  await sql`INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
            VALUES (${sensorId}, now() - make_interval(secs => ${secondsAgo}), ${organizationId}, 4,
                    now() - make_interval(secs => ${secondsAgo}))`.execute(ctx.db);
}

async function eventsOf(ctx: Context, organizationId: string) {
  const rows = await sql<{ type: string; payload: { data: { sensor_id?: string; resumed_at?: string } } }>`
    SELECT type, payload FROM alert_events WHERE organization_id = ${organizationId} ORDER BY seq`.execute(
    ctx.db,
  );
  return rows.rows.map((r) => ({
    type: r.type,
    sensor: r.payload.data.sensor_id ?? null,
    data: r.payload.data,
  }));
}

it('alerts a silent sensor once and its return once, only for an organization that turned them on', async ({
  ctx,
  app,
}) => {
  const watched = await createOrganization(ctx.db);
  const [quiet, busy, idle] = await createSensors(ctx.db, watched.organizationId, 3);
  const other = await createOrganization(ctx.db);
  const [otherQuiet, otherBusy] = await createSensors(ctx.db, other.organizationId, 2);
  // The quiet sensors last reported 5 minutes ago, the busy ones 5 seconds ago; `idle` never did.
  await readingAgo(ctx, watched.organizationId, quiet!, 300);
  await readingAgo(ctx, watched.organizationId, busy!, 5);
  await readingAgo(ctx, other.organizationId, otherQuiet!, 300);
  await readingAgo(ctx, other.organizationId, otherBusy!, 5);

  // Off by default: no sensor alert for either organization.
  await silencePass(ctx.db, ctx.boss, ctx.config);
  expect((await eventsOf(ctx, watched.organizationId)).filter((e) => e.sensor)).toEqual([]);

  const path = `/admin/organizations/${watched.organizationId}/sensor-silence-alerts`;
  expect(await (await app.request(path, { headers: authHeaders(ADMIN) })).json()).toEqual({
    organizationId: watched.organizationId,
    enabled: false,
  });
  const put = await app.request(path, {
    method: 'PUT',
    headers: authHeaders(ADMIN),
    body: JSON.stringify({ enabled: true }),
  });
  expect(put.status).toBe(200);
  expect(await (await app.request(path, { headers: authHeaders(ADMIN) })).json()).toMatchObject({
    enabled: true,
  });
  // Another organization's id that does not exist, and no admin token: refused.
  const missing = await app.request(
    '/admin/organizations/00000000-0000-4000-8000-000000000000/sensor-silence-alerts',
    {
      method: 'PUT',
      headers: authHeaders(ADMIN),
      body: JSON.stringify({ enabled: true }),
    },
  );
  expect(missing.status).toBe(404);
  const anonymous = await app.request(path, {
    method: 'PUT',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ enabled: false }),
  });
  expect(anonymous.status).toBe(401);

  const first = await silencePass(ctx.db, ctx.boss, ctx.config);
  // Only the quiet one: the busy one reported, `idle` never reported within the lookback.
  expect(first.sensorsSilent).toEqual([`${watched.organizationId}/${quiet}`]);
  expect(first.sensorsSilent.join()).not.toContain(idle!);
  expect(first.sensorsSilentNow).toBe(1);
  // Passes after it: still one event.
  await silencePass(ctx.db, ctx.boss, ctx.config);
  await silencePass(ctx.db, ctx.boss, ctx.config);
  let events = await eventsOf(ctx, watched.organizationId);
  expect(events.map((e) => [e.type, e.sensor])).toEqual([['sensor.silent', quiet]]);
  // The organization itself is not silent (its busy sensor reports): no organization.silent.
  expect(events.some((e) => e.type === 'organization.silent')).toBe(false);
  expect((await eventsOf(ctx, other.organizationId)).filter((e) => e.sensor)).toEqual([]);
  const gauge = await ctx.metrics.registry.getSingleMetricAsString('meterbox_silent_sensors');
  expect(gauge).toContain('meterbox_silent_sensors');

  // It reports again (through ingestion): one sensor.resumed, on the next pass only.
  await ctx.db.transaction().execute((trx) =>
    storeGroup(
      trx,
      ctx.boss,
      [
        {
          organizationId: watched.organizationId,
          readings: [
            { sensorId: quiet!, recordedAt: new Date(Date.now() - 1000).toISOString(), temperatureC: 4 },
          ],
        },
      ],
      ctx.clock.now(),
    ),
  );
  const back = await silencePass(ctx.db, ctx.boss, ctx.config);
  expect(back.sensorsResumed).toEqual([`${watched.organizationId}/${quiet}`]);
  expect(back.sensorsSilentNow).toBe(0);
  await silencePass(ctx.db, ctx.boss, ctx.config);
  events = await eventsOf(ctx, watched.organizationId);
  expect(events.map((e) => [e.type, e.sensor])).toEqual([
    ['sensor.silent', quiet],
    ['sensor.resumed', quiet],
  ]);
  expect(events[1]!.data.resumed_at).toBeTruthy();
});

it('ends the silences of an organization that turned sensor alerts off, and of a deactivated sensor, without events', async ({
  ctx,
  app,
}) => {
  const org = await createOrganization(ctx.db);
  const [a, b] = await createSensors(ctx.db, org.organizationId, 2);
  await readingAgo(ctx, org.organizationId, a!, 300);
  await readingAgo(ctx, org.organizationId, b!, 300);
  const path = `/admin/organizations/${org.organizationId}/sensor-silence-alerts`;
  const set = (enabled: boolean) =>
    app.request(path, { method: 'PUT', headers: authHeaders(ADMIN), body: JSON.stringify({ enabled }) });
  expect((await set(true)).status).toBe(200);
  const pass = await silencePass(ctx.db, ctx.boss, ctx.config);
  expect(pass.sensorsSilent.sort()).toEqual(
    [`${org.organizationId}/${a}`, `${org.organizationId}/${b}`].sort(),
  );

  // A deactivated sensor cannot report: its silence ends, with no resumed event.
  await sql`UPDATE sensors SET active = false WHERE id = ${a!}`.execute(ctx.db);
  await silencePass(ctx.db, ctx.boss, ctx.config);
  const states = async () =>
    (
      await sql<{ sensor_id: string }>`SELECT sensor_id FROM silence_state
        WHERE organization_id = ${org.organizationId} AND sensor_id IS NOT NULL`.execute(ctx.db)
    ).rows.map((r) => r.sensor_id);
  expect(await states()).toEqual([b]);

  // Off through the CLI, as an operator would.
  const io = memoryIo();
  expect(await sensorSilenceCommand(ctx, { organization: org.organizationId }, ['off'], io)).toBe(0);
  expect(io.stdout).toContain('per-sensor silence alerts off');
  expect(await sensorSilenceCommand(ctx, { organization: org.organizationId }, ['maybe'], memoryIo())).toBe(
    2,
  );
  await silencePass(ctx.db, ctx.boss, ctx.config);
  expect(await states()).toEqual([]);
  const types = (await eventsOf(ctx, org.organizationId)).map((e) => e.type);
  // The organization itself went silent too (all its readings are 5 minutes old): that is the
  // organization-level alert, unchanged.
  expect(types.filter((t) => t.startsWith('sensor.'))).toEqual(['sensor.silent', 'sensor.silent']);
  expect(types.filter((t) => t === 'organization.silent')).toHaveLength(1);
});
