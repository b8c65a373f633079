// Billable metrics as Metronome serves them: create, get, list (archived ones on request), archive.
import {
  archiveBillableMetric,
  billableMetricView,
  findBillableMetric,
  parseCreateBillableMetric,
} from '../billable-metrics.js';
import { handle } from '../endpoint.js';
import { badRequest } from '../errors.js';
import { type App, parseJson } from '../http.js';
import { paginate, parseLimit } from '../pagination.js';
import type { Runtime } from '../runtime.js';
import { toBillableMetric } from '../state.js';

export function registerBillableMetricRoutes(app: App, rt: Runtime): void {
  app.post('/v1/billable-metrics/create', (c) =>
    handle(rt, c, 'billable_metrics', 'POST /v1/billable-metrics/create', ({ raw }) => {
      const metric = toBillableMetric(parseCreateBillableMetric(parseJson(raw)), rt.clock());
      rt.state.metrics.set(metric.id, metric);
      rt.log('info', 'billable metric created', { id: metric.id, name: metric.name });
      return { status: 200, body: { data: { id: metric.id } } };
    }),
  );

  app.post('/v1/billable-metrics/archive', (c) =>
    handle(rt, c, 'billable_metrics', 'POST /v1/billable-metrics/archive', ({ raw }) => {
      const body = parseJson(raw);
      const id = typeof body === 'object' && body !== null ? (body as { id?: unknown }).id : undefined;
      if (typeof id !== 'string' || id === '') throw badRequest('id is required');
      const metric = archiveBillableMetric(rt.state, id, rt.clock());
      rt.log('info', 'billable metric archived', { id: metric.id });
      return { status: 200, body: { data: { id: metric.id } } };
    }),
  );

  app.get('/v1/billable-metrics/:id', (c) =>
    handle(rt, c, 'billable_metrics', 'GET /v1/billable-metrics/:id', () => ({
      status: 200,
      body: { data: billableMetricView(findBillableMetric(rt.state, c.req.param('id'))) },
    })),
  );

  app.get('/v1/billable-metrics', (c) =>
    handle(rt, c, 'billable_metrics', 'GET /v1/billable-metrics', () => {
      // Archived metrics are left out unless include_archived=true.
      const includeArchived = c.req.query('include_archived') === 'true';
      const metrics = [...rt.state.metrics.values()].filter((m) => includeArchived || m.archivedAt === null);
      const page = paginate(
        metrics,
        parseLimit(c.req.query('limit'), 100),
        c.req.query('next_page'),
        JSON.stringify({ includeArchived }),
      );
      return { status: 200, body: { data: page.data.map(billableMetricView), next_page: page.next_page } };
    }),
  );
}
