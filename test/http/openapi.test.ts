// Routes and their OpenAPI descriptions are registered together (documentedRoutes): the Hono path
// is derived from the documented one, and every route the app answers is in /openapi.json.
import { describe, expect, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { honoPath } from '../../src/http/openapi.js';
import { createTestContext } from '../support/database.js';

describe('documented routes', () => {
  it("derives the Hono path from the documented path under the module's prefix", () => {
    expect(honoPath('/v1/sensors', '/v1/sensors')).toBe('/');
    expect(honoPath('/v1/sensors', '/v1/sensors/{id}')).toBe('/:id');
    expect(honoPath('/admin', '/admin/organizations/{id}/keys/{keyId}')).toBe(
      '/organizations/:id/keys/:keyId',
    );
    expect(honoPath('/', '/healthz')).toBe('/healthz');
    expect(() => honoPath('/v1/sensors', '/v1/sensorsX')).toThrow(/outside/);
    expect(() => honoPath('/admin', '/v1/usage')).toThrow(/outside/);
  });

  it('describes in /openapi.json exactly the routes the app registers', async () => {
    const app = createApp(await createTestContext({ ADMIN_TOKEN: 'openapi-admin-token-0123456789' }));
    const doc = (await (await app.request('/openapi.json')).json()) as {
      paths: Record<string, Record<string, unknown>>;
    };
    const documented = Object.entries(doc.paths)
      .flatMap(([path, methods]) => Object.keys(methods).map((m) => `${m.toUpperCase()} ${path}`))
      .sort();
    const registered = [
      ...new Set(
        app.routes
          .filter((r) => r.method !== 'ALL')
          .map((r) => `${r.method} ${r.path.replace(/:(\w+)/g, '{$1}')}`),
      ),
    ].sort();
    expect(registered).toEqual(documented);
  });
});
