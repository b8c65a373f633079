// GET /v2/core/events/:id: the full form of a thin event, as Stripe serves it (the emulator sends
// only the stream's error reports as thin events).
import { StripeApiError } from '../errors.js';
import { type App, json, requirePermission } from '../http.js';
import type { Runtime } from '../runtime.js';

export function registerV2EventRoutes(app: App, rt: Runtime): void {
  app.get('/v2/core/events/:id', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_event_read');
    const event = rt.errorReports.event(c.req.param('id'));
    if (!event) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such event: '${c.req.param('id')}'`,
        'resource_missing',
        'id',
      );
    }
    return json(c, 200, event);
  });
}
