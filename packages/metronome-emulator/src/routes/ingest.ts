// POST /v1/ingest: Metronome's usage events, with its rules (1 to 100 events, the 34-day and 24-hour
// timestamp window, one bad event failing the whole call, transaction_id dedupe for 34 days), its
// event budget, and the injected faults. Events for customers nobody knows yet are accepted and
// kept: Metronome attributes them once a customer gets that id or alias.
import { randomUUID } from 'node:crypto';
import { handle } from '../endpoint.js';
import { badRequest, tooManyRequests } from '../errors.js';
import { type App, parseJson } from '../http.js';
import { DEDUPE_WINDOW_MS } from '../options.js';
import { checkIngestBody } from '../rules.js';
import type { Runtime } from '../runtime.js';

export function registerIngestRoutes(app: App, rt: Runtime): void {
  app.post('/v1/ingest', (c) =>
    handle(rt, c, 'ingest', 'POST /v1/ingest', ({ raw }) => {
      const { state } = rt;
      const body = parseJson(raw);
      const now = rt.clock();
      if (!rt.ingestLimiter.take(now)) throw tooManyRequests();
      if (!rt.eventLimiter.take(now, Array.isArray(body) ? Math.max(body.length, 1) : 1))
        throw tooManyRequests();
      const check = checkIngestBody(body, now);
      if (!check.ok) throw badRequest(check.message);
      for (const parsed of check.events) {
        state.counters.eventsReceived += 1;
        const event = { id: randomUUID(), ...parsed, receivedAt: now };
        // A repeat within 34 days of the first acceptance is accepted and changes nothing.
        if (state.seen(parsed.transaction_id, now, DEDUPE_WINDOW_MS)) {
          state.counters.duplicate += 1;
          state.duplicates.push(event);
          continue;
        }
        state.record(event);
        state.counters.accepted += 1;
      }
      rt.log('debug', 'usage events ingested', { events: check.events.length });
      return { status: 200 };
    }),
  );
}
