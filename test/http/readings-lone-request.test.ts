// A lone request through the route with the process's default flush rule (INGEST_GROUP_FLUSH, adaptive):
// written at once, not after the group window. The window here is the longest the setting allows, one
// second: under the window rule no request can be answered before it passes (its timer writes the
// group), so one lone request answered sooner shows the rule that did not wait. A loaded machine may
// slow a request past a second now and then, never all five.
import { describe, expect } from 'vitest';
import { authHeaders, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const WINDOW_MS = 1000;
const it = contextTest({ env: { INGEST_GROUP_WINDOW_MS: String(WINDOW_MS) } });

describe('a lone POST /v1/readings with the default flush rule', () => {
  it('is written at once, without waiting for the group window', async ({ ctx, app, org }) => {
    expect(ctx.config.INGEST_GROUP_FLUSH).toBe('adaptive');
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const took: number[] = [];
    for (let i = 1; i <= 5; i++) {
      const started = performance.now();
      const res = await app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({
          readings: [
            {
              sensorId: sensor,
              recordedAt: new Date(Date.now() - i * 60_000).toISOString(),
              temperatureC: 4,
            },
          ],
        }),
      });
      took.push(performance.now() - started);
      expect(res.status).toBe(201);
    }
    expect(Math.min(...took), `answered after ${took.map((ms) => ms.toFixed(0)).join(', ')} ms`).toBeLessThan(
      WINDOW_MS,
    );
    const stored = await ctx.db
      .selectFrom('temperature_readings')
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .where('organization_id', '=', org.organizationId)
      .executeTakeFirstOrThrow();
    expect(Number(stored.n)).toBe(5);
  });
});
